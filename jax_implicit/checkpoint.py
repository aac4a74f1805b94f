"""Training checkpoints with orbax: the train state (params, optimizer state, step, PRNG key) and the
position in the data order, so that a restarted run continues bit for bit where the last one stopped.

Orbax writes each step into a temporary folder renamed into place when complete, so a killed save
leaves no step behind. A step that is on disk but unreadable (truncated or corrupted files) is
skipped with a warning and the one before it is restored.

Sharded states save and restore as they are: each array is written from its shards and read back
straight into the shardings of the restore target (any mesh, not necessarily the one that saved it).
In a multi-host run every process calls `save` and `restore_latest` with its part of the same
global arrays; orbax coordinates the writes, so the directory must be one that all hosts share.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves every `every` steps and whenever forced (epoch ends, the end of the run); keeps `max_to_keep`."""

    def __init__(self, directory: str | Path, every: int, max_to_keep: int):
        if every < 1 or max_to_keep < 1:
            raise ValueError(f"checkpoint every={every} and max_to_keep={max_to_keep} must be >= 1")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves asynchronously (device arrays are copied before this returns, so donating them is safe)."""
        if step in self.manager.all_steps() or not (force or step % self.every == 0):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as (state, meta), or None when there is none.

        `abstract_state` holds `jax.ShapeDtypeStruct`s (with shardings) shaped like the saved state.
        """
        self.manager.wait_until_finished()
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            try:
                restored = self.manager.restore(step, args=args)
                _check_like(restored.state, abstract_state)
            except Exception as e:  # noqa: BLE001 -- any unreadable step falls back to the one before
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {str(e)[:300]}); trying the previous one", stacklevel=2)
                continue
            return restored.state, dict(restored.meta)
        if steps:
            raise RuntimeError(f"no checkpoint in {self.directory} is readable (steps {steps}); "
                               "move the folder away to start afresh")
        return None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_like(state: Any, abstract_state: Any) -> None:
    """Restored leaves must match the expected shapes and dtypes (a damaged file can read back short)."""
    got, want = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
    if len(got) != len(want):
        raise ValueError(f"restored {len(got)} arrays, expected {len(want)}")
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ValueError(f"restored array {g.shape} {g.dtype}, expected {w.shape} {w.dtype}")
