"""Compile the real training micro-step and decoding program for a TPU slice, on any machine.

libtpu (`pip install "jax[tpu]==<jax version>"`, in the test extras) compiles for a TPU topology
without a TPU: `jax.experimental.topologies.get_topology_desc` gives abstract devices, a mesh over
them shards abstract inputs (`model.abstract`, `train_step.abstract_state`), and `jit(...).lower(...)
.compile()` runs XLA's TPU compiler, whose `memory_analysis()` is what the chip would hold.

- Train: `train_step.build_steps`' micro-step (parameters, float32 accumulator, one micro-batch) with
  Adam's moments counted on top: training holds them on the device during the micro-steps.
- Decode: `decode._generate_jit` (prefill and the greedy loop) on a sharded KV cache.

A program that does not fit is refused by the compiler (RESOURCE_EXHAUSTED, in about a second, with
the required size in the message); that size is reported as its peak.
Quirks: the v4 topology lists one device per TensorCore (8 for a v4-8, 16 GiB each), which
`jax.make_mesh` refuses, so meshes are built from the device array directly; libtpu takes a
machine-wide lock file that any JAX process importing it holds, so ALLOW_MULTIPLE_LIBTPU_LOAD is set,
and TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES quiet its warnings about running without a TPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh

from jax_implicit import decode, pinning
from jax_implicit import train_step as steps
from jax_implicit import model as M
from jax_implicit.sharding import MESH_AXES, RULES, Sharder, mesh_shape

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice as the compiler sees it, with the chip's published peaks for the roofline."""

    topology: str  # get_topology_desc's name
    chips: int
    device_bytes: int  # HBM per JAX device of the topology (a v4 TensorCore has half its chip's 32 GiB)
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    chips_per_host_bounds: tuple[int, int, int] | None = None


TARGETS = {
    "tpu-v4-8": Target("v4:2x2x1", 4, 16 * GiB, 275e12, 1228e9, (2, 2, 1)),
    "tpu-v5e-8": Target("v5e:2x4", 8, 16 * GiB, 197e12, 819e9),
    "tpu-v5e-16": Target("v5e:4x4", 16, 16 * GiB, 197e12, 819e9),
    "tpu-v5p-8": Target("v5p:2x2x1", 4, 95 * GiB, 459e12, 2765e9),
}


@dataclasses.dataclass
class Compiled:
    """Per-device bytes of one compiled program; `refused` when the compiler ran out of HBM."""

    arguments: int
    temporaries: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers
    resident: int  # held on the device beside the program (Adam's moments during the micro-steps)
    available: int  # the compiler's HBM limit per device
    refused: bool = False
    flops: float = 0.0  # per device, as XLA counts them (a scan body once)
    bytes_accessed: float = 0.0

    @property
    def peak(self) -> int:
        if self.refused:  # the compiler's own figure (temporaries), plus what it did not count
            return self.temporaries + self.arguments + self.resident
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.resident

    @property
    def fits(self) -> bool:
        return not self.refused and self.peak <= self.available


def devices(target: str) -> list:
    """The abstract devices of a TPU slice (no TPU needed)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {sorted(TARGETS)}")
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    t = TARGETS[target]
    kw = {} if t.chips_per_host_bounds is None else dict(chips_per_host_bounds=t.chips_per_host_bounds)
    return list(topologies.get_topology_desc(platform="tpu", topology_name=t.topology, **kw).devices)


def sharder(mesh_cfg, devs: list) -> Sharder:
    """A Sharder over `devs` with the mesh sizes of a `config.mesh()` section (devices in topology order)."""
    shape = mesh_shape(mesh_cfg, len(devs))
    mesh = Mesh(np.asarray(devs).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Sharder(mesh, RULES[mesh_cfg.get("rules", "fsdp")])


_NEED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _size(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "_KMGT".index(unit or "_"))


def _compile(lowered, arguments: int, resident: int, available: int) -> Compiled:
    """Compile; `arguments` (per-device bytes of the inputs) stands in for the compiler's when it refuses."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        match = _NEED.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not match:
            raise
        return Compiled(arguments, _size(*match.groups()[:2]), 0, 0, resident, _size(*match.groups()[2:]), refused=True)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                    resident, available, flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)))


def _per_device(tree: Any) -> int:
    return sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(tree))


def train_step(cfg: M.ModelConfig, sh: Sharder, micro_batch: int, seq: int, available: int) -> Compiled:
    """Compile `train_step.build_steps`' micro-step for (micro_batch, seq) tokens on `sh`'s mesh."""
    optimizer = optax.adam(1e-5)
    abstract, _ = steps.abstract_state(cfg, optimizer, 0, sh)  # full finetuning: nothing frozen
    state_sh = jax.tree.map(lambda s: s.sharding, abstract)
    batch_sh = sh.rows((micro_batch, seq))
    graphdef = nnx.split(M.abstract(cfg))[0]
    micro, _ = steps.build_steps(graphdef, optimizer, state_sh, batch_sh)
    accum = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), abstract["params"])
    batch = {k: jax.ShapeDtypeStruct((micro_batch, seq), dt, sharding=batch_sh)
             for k, dt in (("tokens", jnp.int32), ("mask", jnp.bool_), ("weights", jnp.float32))}
    args = (abstract["params"], accum, batch, {})  # no frozen weights
    with pinning.active(sh):
        lowered = micro.lower(*args)
    return _compile(lowered, _per_device(args), _per_device(abstract["opt_state"]), available)


def decode_program(cfg: M.ModelConfig, sh: Sharder, batch: int, slots: int, prompt: int, available: int) -> Compiled:
    """Compile `decode._generate_jit`: a (batch, prompt) prefill and greedy decoding into `slots` cache slots,
    with the weights held as decoding holds them (one buffer per layer)."""
    decoder = M.abstract(cfg, unstacked=True)
    graphdef, state = nnx.split(decoder)
    shardings = sh.tree(state, M.logical_axes(decoder))
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), state, shardings)
    decoder = nnx.merge(graphdef, state)
    cache = jax.eval_shape(lambda: M.KVCache.init(cfg, batch, slots))
    cache = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), cache, sh.cache(cache))
    rows = sh.rows((batch, prompt))
    ids, mask = (jax.ShapeDtypeStruct((batch, prompt), dt, sharding=rows) for dt in (jnp.int32, jnp.bool_))
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=sh.replicated)
    eos = jax.ShapeDtypeStruct((len(cfg.eos_token_ids) or 1,), jnp.int32, sharding=sh.replicated)
    with pinning.active(sh):
        lowered = decode._generate_jit.lower(decoder, ids, mask, mask, cache, None, eos, scalar(jnp.float32),
                                             scalar(jnp.float32), None, max_new_tokens=slots - prompt + 1)
    return _compile(lowered, _per_device((state, ids, mask, mask, cache)), 0, available)


def decode_estimate(cfg: M.ModelConfig, sh: Sharder, batch: int, slots: int, prompt: int) -> int:
    """The planner's per-device bytes for decoding: weights, the KV cache, one layer of the prefill and a step's
    float32 logits. The prefill layer is everything a layer's forward makes for `prompt` tokens attending
    over `slots` keys (`plan.layer_bytes_per_token`), the float32 exponentials the softmax holds beside
    the scores, and the layer's keys and values read out of the cache. The loop's segments
    (`decode.attended_lengths`) hold smaller caches beside the full one: at most two at a time, while one
    grows into the next."""
    from jax_implicit import plan as P

    decoder = M.abstract(cfg)
    state = nnx.state(decoder)
    weights = _per_device(jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), state,
                                       sh.tree(state, M.logical_axes(decoder))))
    cache = jax.eval_shape(lambda: M.KVCache.init(cfg, batch, slots))
    cache = _per_device(jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), cache,
                                     sh.cache(cache)))
    sizes = decode.attended_lengths(prompt, slots)[:-1]  # the segments before the last, which uses the full cache
    segments = max((a + b for a, b in zip(sizes, sizes[1:] + [0])), default=0) * cache // slots
    rows = sh.rows((batch, 1)).shard_shape((batch, 1))[0]
    split = P.tensor_split(cfg, sh)
    heads, kv_heads = cfg.num_heads // split["heads"], cfg.num_kv_heads // split["kv_heads"]
    prefill = rows * (prompt * (P.layer_bytes_per_token(cfg, slots, split) + 4 * heads * slots)
                      + 2 * slots * kv_heads * cfg.head_dim * np.dtype(M.DTYPES[cfg.dtype]).itemsize)
    return weights + cache + segments + prefill + rows * 2 * 4 * cfg.vocab_size


def report(cfg: M.ModelConfig, name: str, mesh_cfg, target: str, micro_batch: int, seq: int, decode_cfg,
           headroom: float = 0.9) -> tuple[str, bool]:
    """Compile the training micro-step and the decoder for `target`; the compiler's per-device bytes beside
    the planner's estimate and the HBM. Returns the text and whether both programs fit."""
    from jax_implicit import plan as P

    devs = devices(target)
    t = TARGETS[target]
    sh = sharder(mesh_cfg, devs)
    hw = P.Hardware(len(devs), t.device_bytes, f"{target} as compiled", t.chips, t.peak_flops, t.hbm_bandwidth)
    gib = lambda b: f"{b / GiB:6.2f} GiB"
    mesh = " ".join(f"{a}={n}" for a, n in sh.mesh.shape.items())
    lines = [f"{name} on {target} ({t.topology}: {len(devs)} devices of {t.device_bytes / GiB:.0f} GiB HBM), "
             f"mesh {mesh}, rules {mesh_cfg.get('rules', 'fsdp')}"]
    ok = True
    step = train_step(cfg, sh, micro_batch, seq, t.device_bytes)
    estimate = P.plan(cfg, mesh_cfg, hw, micro_batch, seq, headroom).total
    dec_cfg = cfg.replace(param_dtype=decode_cfg.param_dtype, dtype=decode_cfg.dtype)
    dec = decode_program(dec_cfg, sh, decode_cfg.batch, decode_cfg.slots, decode_cfg.prompt, t.device_bytes)
    dec_estimate = decode_estimate(dec_cfg, sh, decode_cfg.batch, decode_cfg.slots, decode_cfg.prompt)
    for what, c, est in ((f"train micro-step {micro_batch} x {seq} ({cfg.param_dtype} masters, {cfg.dtype} compute, "
                          f"remat {cfg.remat}, loss chunk {cfg.loss_chunk or 'none'})", step, estimate),
                         (f"decode {decode_cfg.batch} rows x {decode_cfg.slots} cache slots ({dec_cfg.param_dtype})",
                          dec, dec_estimate)):
        ok &= c.fits
        parts = ("refused by the compiler (RESOURCE_EXHAUSTED): temporaries " + gib(c.temporaries).strip() if c.refused
                 else f"arguments {gib(c.arguments).strip()}, temporaries {gib(c.temporaries).strip()}, "
                      f"outputs {gib(c.outputs - c.aliased).strip()} (not aliased)")
        extra = f", Adam moments {gib(c.resident).strip()}" if c.resident else ""
        lines += [f"  {what}:", f"    {parts}{extra}",
                  f"    peak {gib(c.peak)} per device (compiler) | planner {gib(est)} | HBM {gib(c.available)}: "
                  f"{'fits' if c.fits else 'does NOT fit'}"]
        if c.flops:
            lines.append(f"    compiled cost per device: {c.flops / 1e12:.2f} TFLOP, {c.bytes_accessed / 1e9:.2f} GB "
                         f"accessed (the layer scan counted once)")
    if not step.fits:
        lines.append(f"  to fit: {P.suggest(cfg, mesh_cfg, hw, micro_batch, seq, headroom)} (planner)")
    return "\n".join(lines), ok


def main(cfg, model_cfg: M.ModelConfig) -> int:
    """`plan --config.compile_for=<target>|all`: exit status 1 when a program does not fit a target."""
    targets = sorted(TARGETS) if cfg.compile_for == "all" else [cfg.compile_for]
    status = 0
    for target in targets:
        text, ok = report(model_cfg, cfg.model.path, cfg.mesh, target, cfg.train.micro_batch, cfg.data.max_seq_length,
                          cfg.decode, cfg.get("headroom", 0.9))
        print(text, flush=True)
        status |= not ok
    return status
