"""Training checkpoints with orbax: the train state (params, optimizer state, step, PRNG key) and the
position in the data order, so that a restarted run continues bit for bit where the last one stopped.

Orbax writes each step into a temporary folder renamed into place when complete, so a killed save
leaves no step behind. Orbax checksums only its shard indexes, not the array data, so each save also
records a fingerprint of every array (`fingerprint`); a restore recomputes it and checks that every
float is finite. A step that is unreadable, altered on disk or non-finite is moved aside into
`<directory>.damaged/` (kept for inspection, out of orbax's sight) with a one-line warning, and the one
before it is restored; the run then saves that step afresh when it reaches it again.

Sharded states save and restore as they are: each array is written from its shards and read back
straight into the shardings of the restore target (any mesh, not necessarily the one that saved it).
In a multi-host run every process calls `save` and `restore_latest` with its part of the same
global arrays; orbax coordinates the writes, so the directory must be one that all hosts share.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DAMAGED = ".damaged"  # suffix of the folder beside the checkpoints that damaged steps are moved into


class CheckpointError(RuntimeError):
    """A state that must not be saved, or a checkpoint folder with no usable step."""


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of an array as uint32 (one element per 1-, 2- or 4-byte value, two per 8-byte value)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of the bits, modulo 2**32, with odd weights.

    Any single flipped bit changes both sums (an odd weight times a power of two below 2**32 is never
    0 mod 2**32); other damage escapes with probability ~2**-64. Integer addition wraps, so the sums do
    not depend on reduction order, mesh or sharding, and the positions come from iotas rather than a
    flattening reshape, so a sharded array is never gathered.
    """
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):
        stride = int(np.prod(bits.shape[d + 1:], dtype=np.uint64) % 2**32)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    w1 = index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    w2 = (index ^ (index >> 15)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * w1, dtype=jnp.uint32), jnp.sum(bits * w2, dtype=jnp.uint32)])


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every float of `tree` is finite (traceable; integer leaves always are)."""
    floats = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(floats)) if floats else jnp.bool_(True)


@jax.jit
def _fingerprints(state: Any) -> tuple[Any, jax.Array]:
    return jax.tree.map(_leaf_fingerprint, state), all_finite(state)


def fingerprint(state: Any) -> tuple[dict[str, str], list[str]]:
    """Per leaf (by its tree path), a 64-bit fingerprint of the raw bits as hex; and the paths of the
    leaves holding a non-finite value (empty when all are finite). Computed on the device(s)."""
    sums, finite = jax.device_get(_fingerprints(state))
    prints = {jax.tree_util.keystr(path): f"{int(a):08x}{int(b):08x}"
              for path, (a, b) in jax.tree_util.tree_leaves_with_path(sums)}
    bad = [] if finite else [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state)
                             if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x)))]
    return prints, bad


class Checkpoints:
    """Saves every `every` steps and whenever forced (epoch ends, the end of the run); keeps `max_to_keep`."""

    def __init__(self, directory: str | Path, every: int, max_to_keep: int):
        if every < 1 or max_to_keep < 1:
            raise ValueError(f"checkpoint every={every} and max_to_keep={max_to_keep} must be >= 1")
        self.directory = Path(directory).absolute()
        self.every = every
        # temporary folders of a killed save are removed at start: safe because one run holds the folder
        # (runlock) and orbax names them by step
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves asynchronously (device arrays are copied before this returns, so donating them is safe),
        with the fingerprint of every array. A state holding a non-finite value is never saved."""
        if step in self.manager.all_steps() or not (force or step % self.every == 0):
            return False
        prints, bad = fingerprint(state)
        if bad:
            raise CheckpointError(f"the state at step {step} holds non-finite values in {', '.join(bad[:4])}; "
                                  f"not saved (the checkpoints in {self.directory} stay as they were)")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  integrity=ocp.args.JsonSave({"fingerprint": prints}))
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest intact checkpoint as (state, meta), or None when there is none.

        `abstract_state` holds `jax.ShapeDtypeStruct`s (with shardings) shaped like the saved state.
        """
        self.manager.wait_until_finished()
        steps = sorted(self.manager.all_steps(), reverse=True)
        found = self._restore_first(steps, abstract_state)
        if found is None and steps:
            raise CheckpointError(f"no checkpoint in {self.directory} is intact (steps {steps} were moved to "
                                  f"{self.directory}{DAMAGED}); move the run folder away to start afresh")
        return found

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Checkpoint `step` as (state, meta), verified like `restore_latest`; an error when absent or damaged."""
        self.manager.wait_until_finished()
        if step not in self.manager.all_steps():
            raise CheckpointError(f"{self.directory} has no step {step} (it has {sorted(self.manager.all_steps())})")
        found = self._restore_first([step], abstract_state)
        if found is None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged (moved to "
                                  f"{self.directory}{DAMAGED})")
        return found

    def _restore_first(self, steps: list[int], abstract_state: Any) -> tuple[Any, dict] | None:
        for step in steps:
            # saved before fingerprints existed: restored with shapes and finiteness checked, and a warning
            legacy = not (self.directory / str(step) / "integrity").exists()
            items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    **items, **({} if legacy else dict(integrity=ocp.args.JsonRestore()))))
                _check_like(restored.state, abstract_state)
                _verify(restored.state, None if legacy else restored.integrity)
            except Exception as e:  # noqa: BLE001 -- any unusable step falls back to the one before
                moved = self._set_aside(step)
                reason = (str(e).strip().splitlines() or [""])[0]
                reason = reason if len(reason) <= 200 else f"{reason[:90]} ... {reason[-100:]}"  # cause at the end
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                              f"{reason}); moved to {moved}; restoring the one before", stacklevel=3)
                continue
            if legacy:
                warnings.warn(f"checkpoint step {step} in {self.directory} was saved without fingerprints (by an "
                              "older version): restored with only its shapes and finiteness checked", stacklevel=3)
            return restored.state, dict(restored.meta)
        return None

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step out of orbax's folder (not deleted: it may be worth a look)."""
        aside = self.directory.with_name(self.directory.name + DAMAGED)
        dest, n = aside / str(step), 1
        while dest.exists():
            dest, n = aside / f"{step}-{n}", n + 1
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        if jax.process_count() > 1:
            from orbax.checkpoint import multihost

            multihost.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()
        return dest

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        """Waits for the last save; closing again is a no-op."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    """Whether the record was logged from orbax's code or carries an exception raised there."""
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return any(f"{os.sep}orbax{os.sep}" in path for path in [record.pathname, *(f.filename for f in frames)])


class _OneLineOfBackgroundErrors(logging.Filter):
    """A save or read that fails in orbax's background work is raised in the caller, which reports it in one
    line. Two more reports of it are trimmed: orbax's writer threads log it with the whole traceback (kept to
    its first line), and asyncio logs every other concurrent read that failed too as `Task exception was never
    retrieved` with its traceback (dropped: the same damage, already reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and _raised_in_orbax(record)):
            return True
        if record.name == "asyncio":
            return False
        record.exc_info, record.exc_text = None, None
        return True


def _drop_closed_loop_noise(previous=sys.unraisablehook):
    """When a save or a read fails midway, tensorstore's other transfers still finish and call back into orbax's
    event loop, already closed: each prints an unraisable `RuntimeError: Event loop is closed` traceback that
    buries the real error. Only those are dropped."""

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    return hook


for _logger in ("absl", "asyncio"):  # orbax logs through absl; its reads run as asyncio tasks
    logging.getLogger(_logger).addFilter(_OneLineOfBackgroundErrors())
sys.unraisablehook = _drop_closed_loop_noise()


def _check_like(state: Any, abstract_state: Any) -> None:
    """Restored leaves must match the expected shapes and dtypes (a damaged file can read back short)."""
    got, want = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
    if len(got) != len(want):
        raise ValueError(f"restored {len(got)} arrays, expected {len(want)}")
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ValueError(f"restored array {g.shape} {g.dtype}, expected {w.shape} {w.dtype}")


def _verify(state: Any, integrity: dict | None) -> None:
    """The restored arrays must be finite and carry the fingerprints recorded when they were saved
    (`integrity` None: a checkpoint from before fingerprints, checked for finiteness only)."""
    recorded = integrity.get("fingerprint") if isinstance(integrity, dict) else None
    if integrity is not None and not isinstance(recorded, dict):
        raise ValueError("its record of fingerprints is damaged")
    prints, bad = fingerprint(state)
    changed = sorted(k for k in prints if recorded is not None and recorded.get(k) != prints[k])
    if changed:
        raise ValueError(f"{len(changed)} array(s) differ from what was saved: {', '.join(changed[:3])}")
    if bad:
        raise ValueError(f"non-finite values in {', '.join(bad[:3])}")
