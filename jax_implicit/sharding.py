"""Placing parameters, optimizer state, batches and the KV cache on a device mesh, from logical axes.

Every array in this project names its dimensions with logical axes (`model.logical_axes`,
`model.KVCache.logical_axes`, and `batch`/`seq` for inputs). A rule table maps each logical axis to mesh
axes; `Sharder` turns (logical axes, shape) into a `NamedSharding`, so the same code runs pure
data parallel, FSDP or FSDP + tensor parallel by changing `config.mesh().rules`.

The mesh has three axes, outermost first: `data` (replicas; may cross slow host links),
`fsdp` (batch *and* parameter shards: parameters are all-gathered layer by layer inside the scan),
`tensor` (heads/mlp/vocab split; the chattiest axis, so it is innermost, on the fastest links).
Axis types are `AxisType.Auto`: the model's einsums carry no sharding annotations, so XLA
propagates shardings from the jit's `in_shardings`/`out_shardings` (and `constrain`). `Explicit`
axes (the `jax.make_mesh` default) make shardings part of every op's type, and our ops then fail
to trace: the embedding lookup of fsdp-split rows in an fsdp-split table gives a spec that names
`fsdp` twice (DuplicateSpecError), and einsums whose contracted dimension is split on both sides
raise ShardingTypeError until each is given an `out_sharding` (checked with jax 0.10).

Fallback (documented behaviour, never a wrong result): when a dimension's size is not divisible
by the product of the mesh axes its rule names, the longest prefix of those axes that divides it
is used, down to none (replicated along that dimension), and a warning names the dimension.
E.g. SmolLM2's 3 KV heads on tensor=2 are replicated over `tensor` while its 1536-wide MLP and
its vocabulary are still split. A mesh axis is used at most once per array (first dimension wins).

Typical use (train/decode; tests/test_sharding.py `compiled` does exactly this):

    sh = Sharder.from_config(cfg.mesh)
    decoder = sh.load_hf(path, param_dtype=..., dtype=...)  # read straight into shards
    graphdef, params = nnx.split(decoder)
    axes = model.logical_axes(decoder)
    p_sh = sh.tree(params, axes)                            # params, grads, accumulators
    o_sh = sh.tree(jax.eval_shape(tx.init, params), axes)   # optax state mirrors the params
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    step = jax.jit(step_fn, in_shardings=(p_sh, o_sh, sh.batch(batch)), out_shardings=(p_sh, o_sh, sh.replicated),
                   donate_argnums=(0, 1))
    batch = sh.global_batch(rows_of_this_process, global_rows)  # rows: distributed.local_rows(sh.rows(shape), shape)
    cache = sh.put(cache, sh.cache(cache))                  # KV cache: rows like the batch, KV heads like params
    with pinning.active(sh):                                # the model pins its activations while traced here
        params, opt_state = step(params, opt_state, batch)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_implicit import model as M

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("batch", "seq")  # logical axes of input arrays: (batch, seq, ...)

# logical axis -> mesh axes. Axes not named are replicated (layers, head_dim, norm, seq, cache_seq).
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    # replicas only: every device holds all parameters and optimizer state
    "dp": {"batch": ("data",)},
    # ZeRO-3 style: parameters, gradients and Adam moments split over `fsdp` along `embed`
    "fsdp": {"batch": ("data", "fsdp"), "embed": ("fsdp",)},
    # plus Megatron-style tensor parallelism over heads, MLP width and vocabulary
    "fsdp_tp": {"batch": ("data", "fsdp"), "embed": ("fsdp",), "heads": ("tensor",), "kv_heads": ("tensor",),
                "mlp": ("tensor",), "vocab": ("tensor",)},
}

log = logging.getLogger(__name__)


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with a single -1 filled from the device count; errors name the config key."""
    shape = []
    for axis in MESH_AXES:
        v = sizes.get(axis, 1)
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{axis}={v!r}: expected a positive integer or -1")
        shape.append(v)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {n_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {n_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all (global) devices; `jax.make_mesh` orders them for the topology."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


@functools.cache
def _warn_fallback(name: str, size: int, mesh_axes: tuple[tuple[str, int], ...]) -> None:
    log.warning("%s=%d is not divisible by mesh axes %s: dropping %r (replicated along it)",
                name, size, dict(mesh_axes), mesh_axes[-1][0])


def _path_names(path: tuple) -> tuple[str, ...]:
    """Dict keys and attribute names along a pytree path (nnx's `.value` and list indices dropped)."""
    names = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", None))
        if isinstance(name, str) and not (isinstance(k, jax.tree_util.GetAttrKey) and name == "value"):
            names.append(name)
    return tuple(names)


def is_axes(x: Any) -> bool:
    """A tuple of logical axis names: a leaf, not a subtree, when mapping over a tree of axes."""
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _flat_axes(axes: Mapping) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{('layers', 'wq'): ('layers', 'embed', 'heads', 'head_dim'), ...} from a nested axes dict."""
    leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0]
    return {_path_names(p): a for p, a in leaves}


@dataclasses.dataclass(frozen=True)
class Sharder:
    """A mesh and a rule table: logical axes -> `NamedSharding`s for any pytree in this project."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]]

    def __hash__(self) -> int:  # hashable: `pinning.active` makes it the value of a jit-cache-sensitive context
        return hash((self.mesh, tuple(sorted(self.rules.items()))))

    def __post_init__(self):
        for logical, axes in self.rules.items():
            unknown = set(axes) - set(self.mesh.axis_names)
            if unknown:
                raise ValueError(f"rule {logical!r} names mesh axes {sorted(unknown)} not in {self.mesh.axis_names}")
        used = {a for axes in self.rules.values() for a in axes}
        idle = [f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1 and a not in used]
        if idle:
            raise ValueError(f"mesh axes {', '.join(idle)} are used by no rule of this table "
                             f"({sorted(self.rules)}): every device along them would repeat the same work")

    @classmethod
    def from_config(cls, mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> "Sharder":
        """From a `config.mesh()` section: sizes data/fsdp/tensor and `rules` (a name in RULES)."""
        name = mesh_cfg.get("rules", "fsdp")
        if name not in RULES:
            raise ValueError(f"mesh.rules={name!r}; expected one of {sorted(RULES)}")
        return cls(make_mesh(mesh_cfg, devices), RULES[name])

    # ------------------------------------------------------------------ single arrays

    def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes and shape (divisibility fallback: module doc)."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
        used: set[str] = set()
        out = []
        for name, size in zip(axes, shape):
            mesh_axes = [a for a in self.rules.get(name, ()) if a not in used] if name else []
            while mesh_axes and size % math.prod(self.mesh.shape[a] for a in mesh_axes):
                _warn_fallback(name, size, tuple((a, self.mesh.shape[a]) for a in mesh_axes))
                mesh_axes.pop()
            used.update(mesh_axes)
            out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
        return PartitionSpec(*out)

    def named(self, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Inside jit: pin an activation's sharding (e.g. logits as (batch, seq, vocab))."""
        return jax.lax.with_sharding_constraint(x, self.named(axes, x.shape))

    # ------------------------------------------------------------------ pytrees

    def tree(self, tree: Any, axes: Mapping) -> Any:
        """Shardings for every leaf of `tree`, looked up by path in `axes` (`model.logical_axes(decoder)`).

        A leaf whose path ends with a parameter's path and has its rank takes that parameter's
        sharding, so one call covers the parameters (Decoder, nnx.State or pure dict), gradients and
        optax state (Adam's `mu`/`nu` mirror the parameters); other leaves (step counts) are replicated.
        """
        flat = _flat_axes(axes)

        def one(path, leaf):
            names = _path_names(path)
            for i in range(len(names)):
                ax = flat.get(names[i:])
                if ax is not None and len(ax) == np.ndim(leaf):
                    return self.named(ax, np.shape(leaf))
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, tree)

    def batch(self, tree: Any) -> Any:
        """Shardings for input arrays shaped (batch, seq, ...): rows split over the batch mesh axes."""
        return jax.tree.map(lambda x: self.rows(np.shape(x)), tree)

    def rows(self, shape: Sequence[int]) -> NamedSharding:
        """The sharding of one input array shaped (batch, seq, ...)."""
        return self.named((BATCH_AXES + (None,) * len(shape))[:len(shape)], shape)

    def cache(self, cache: M.KVCache) -> M.KVCache:
        """A KVCache of shardings (from `KVCache.logical_axes`): rows like the batch, KV heads like the parameters."""
        return jax.tree.map(lambda x, axes: self.named(axes, np.shape(x)), cache, cache.logical_axes())

    def put(self, tree: Any, shardings: Any) -> Any:
        return jax.device_put(tree, shardings)

    def global_batch(self, local: Any, global_rows: int) -> Any:
        """Global arrays from this process's rows (`distributed.local_rows`): what a multi-host loader feeds."""
        def one(x):
            shape = (global_rows, *np.shape(x)[1:])
            return jax.make_array_from_process_local_data(self.rows(shape), x, shape)

        return jax.tree.map(one, local)

    # ------------------------------------------------------------------ model weights

    def hf_sharding(self, cfg: M.ModelConfig):
        """The `sharding=` callable for `convert.load_hf`: logical axes -> NamedSharding (sizes from `cfg`)."""
        sizes = dict(vocab=cfg.vocab_size, embed=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads,
                     kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp=cfg.intermediate_size, norm=cfg.hidden_size)
        return lambda axes: self.named(axes, [sizes[a] for a in axes])

    def load_hf(self, path: str | Path, **kw) -> M.Decoder:
        """`convert.load_hf` with every parameter read straight into its shards (each host reads its slices)."""
        from jax_implicit import convert

        cfg = M.from_hf_config(path)
        return convert.load_hf(path, sharding=self.hf_sharding(cfg), **kw)

    def place(self, decoder: M.Decoder) -> M.Decoder:
        """An existing (e.g. freshly initialised) Decoder moved onto the mesh by its logical axes."""
        return self.put(decoder, self.tree(decoder, M.logical_axes(decoder)))
