"""Memory planner: per-device bytes of a training run for a model, a mesh and an accelerator, whether it fits,
what to change if not, and a roofline step time.

    python -m jax_implicit.plan --config=configs/plan.py:llama2_7b
    python -m jax_implicit.plan --config=configs/train/paper.py:olmo_7b,response
    python -m jax_implicit.plan --config=configs/plan.py:llama2_7b --config.compile_for=tpu-v5e-16   # jax_implicit.aot

Reads `model` (HF folder, or a hub id of PRESETS; `remat` and `loss_chunk` as in memory.py), `mesh`,
`data.max_seq_length`, `train.micro_batch` and, if present, `hardware` (a HARDWARE name or "all"),
`headroom` and `compile_for`. Shards are computed with the same rule tables as the real run
(`sharding.Sharder` on an abstract mesh), so the figures follow them.

What a device holds, as `train.py` runs (float32 accumulator, optax Adam):
- parameters, param dtype;
- gradients: the float32 accumulator plus one micro-batch's gradient (param dtype);
- optimizer state: Adam's two moments, param dtype (optax's default);
- activations saved for the backward pass of one micro-batch, per layer and token under the remat policy
  (`kept_bytes_per_token`, checked against the residuals `jax.vjp` keeps for this model), one layer's
  full set while it is recomputed, plus the final norm, the float32 logits and their gradient (one
  loss chunk at a time), and the attention mask;
- weight copies: the compute-dtype casts of the weights that the backward pass keeps (none when the
  compute dtype is the param dtype, or with remat, which recomputes them);
- workspace: with FSDP, one layer's weights gathered (compute dtype) and its float32 gradient.
A run fits when the total is at most `headroom` (default 0.9) of the device memory: the rest is left
to XLA's temporaries, fragmentation and the runtime. Against the TPU compiler (jax_implicit.aot) the
totals are 8-11% low for the 7B training steps (README, "Compile for the target").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from jax_implicit import memory
from jax_implicit import model as M
from jax_implicit.sharding import MESH_AXES, RULES, Sharder, is_axes, mesh_shape

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
    devices: int  # JAX devices in the slice / host
    bytes_per_device: int
    note: str
    chips: int = 0  # accelerator chips (0: one per device); the roofline's peaks are per chip
    peak_flops: float = 0.0  # dense bf16 FLOP/s per chip (vendor figure)
    hbm_bandwidth: float = 0.0  # bytes/s per chip

    @property
    def chip_count(self) -> int:
        return self.chips or self.devices


HARDWARE = {
    "tpu-v4-8": Hardware(4, 32 * GiB, "TPU v4-8: 4 chips (one JAX device each, megacore), 32 GiB HBM per chip",
                         4, 275e12, 1228e9),
    "tpu-v5e-8": Hardware(8, 16 * GiB, "TPU v5e-8 (v5litepod-8): 8 chips, 16 GiB HBM per chip", 8, 197e12, 819e9),
    "tpu-v5e-16": Hardware(16, 16 * GiB, "TPU v5e-16: 16 chips over 4 hosts, 16 GiB HBM per chip", 16, 197e12, 819e9),
    "tpu-v5p-8": Hardware(4, 95 * GiB, "TPU v5p-8: 4 chips (megacore), 95 GiB HBM per chip", 4, 459e12, 2765e9),
    "gpu-8x80gb": Hardware(8, 80 * GiB, "one host with 8 x A100 80GB", 8, 312e12, 2039e9),
    "gpu-8xh100": Hardware(8, 80 * GiB, "one host with 8 x H100 80GB SXM", 8, 989e12, 3350e9),
}


def hardware_spec(hardware: "str | Hardware") -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise ValueError(f"hardware={hardware!r}; expected one of {sorted(HARDWARE)}")
    return HARDWARE[hardware]


# HF config.json values of the paper's models, so the planner needs neither network nor weights.
PRESETS = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2),
    "allenai/OLMo-7B-hf": dict(model_type="olmo", vocab_size=50304, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=2048, clip_qkv=None, tie_word_embeddings=False,
                               eos_token_id=50279, pad_token_id=1),
}


def model_config(path: str, param_dtype: str, dtype: str) -> M.ModelConfig:
    if path in PRESETS:
        return M.from_hf_config(PRESETS[path], param_dtype=param_dtype, dtype=dtype)
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"model.path={path!r}: neither a folder with config.json nor one of {sorted(PRESETS)}")
    return M.from_hf_config(path, param_dtype=param_dtype, dtype=dtype)


def norm_bytes_per_token(cfg: M.ModelConfig) -> int:
    c, D = np.dtype(M.DTYPES[cfg.dtype]).itemsize, cfg.hidden_size
    return 4 * D + 8 + 2 * c * D if cfg.norm == "rms" else 8 * D + 8 + c * D


def layer_bytes_per_token(cfg: M.ModelConfig, seq: int, split: Mapping[str, int]) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token, without rematerialisation.

    Two norms (RMS: a float32 copy of the input, two float32 statistics, the normalised and the
    scaled input; OLMo's LayerNorm: the float32 input and its centred copy, two statistics, the
    output), the RoPE tables, q/k/v and the attention output, the attention mask, float32 scores and
    compute-dtype probabilities over `seq` keys plus two softmax statistics per head, and six
    MLP-wide tensors (gate, up, their activations and product). `split`: how many devices share
    the heads, kv_heads and mlp axes.
    """
    c = np.dtype(M.DTYPES[cfg.dtype]).itemsize
    F, H, K, Dh = cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h, k, f = H // split["heads"], K // split["kv_heads"], F // split["mlp"]
    norms = 2 * norm_bytes_per_token(cfg)
    return norms + 4 * Dh * c + (2 * h + 2 * k) * Dh * c + h * (seq * (1 + 4 + c) + 8) + 6 * f * c


@dataclasses.dataclass
class Plan:
    hardware: str
    mesh: dict[str, int]
    micro_batch: int
    rows_per_device: int
    params: int  # parameter count
    bytes: dict[str, int]  # per device, by component
    usable: int

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def _param_leaves(cfg: M.ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(logical axes, shape) of every parameter, without allocating any."""
    abstract = M.abstract(cfg)
    axes = jax.tree.leaves(M.logical_axes(abstract), is_leaf=is_axes)
    return [(a, v.shape) for a, v in zip(axes, jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))]


def param_count(cfg: M.ModelConfig) -> int:
    return sum(math.prod(s) for _, s in _param_leaves(cfg))


def _elems(sh: Sharder, axes, shape, only: tuple[str, ...] = MESH_AXES) -> int:
    """Elements per device of an array, counting the splits over the mesh axes in `only`."""
    n = math.prod(shape)
    for entry in sh.spec(axes, shape):
        for a in (entry,) if isinstance(entry, str) else entry or ():
            n //= sh.mesh.shape[a] if a in only else 1
    return n


def kept_bytes_per_token(cfg: M.ModelConfig, seq: int, split: Mapping[str, int]) -> int:
    """Bytes one layer keeps per token for the backward pass under `cfg.remat` (`memory.REMAT_POLICIES`):
    everything (none); its input, the scan carry (full); its input and the weight-matmul outputs that the
    backward pass reads: q, k, v, the attention output projection, gate and up (dots; the MLP's down
    projection only adds into the residual stream)."""
    c = np.dtype(M.DTYPES[cfg.dtype]).itemsize
    if cfg.remat == "none":
        return layer_bytes_per_token(cfg, seq, split)
    D, Dh = cfg.hidden_size, cfg.head_dim
    if cfg.remat == "full":
        return c * D
    h, k = cfg.num_heads // split["heads"], cfg.num_kv_heads // split["kv_heads"]
    f = cfg.intermediate_size // split["mlp"]
    return c * (2 * D + (h + 2 * k) * Dh + 2 * f)


def tensor_split(cfg: M.ModelConfig, sh: Sharder) -> dict[str, int]:
    """How many devices share the heads, kv_heads, mlp and vocab axes under `sh`'s rules."""
    return {a: getattr(cfg, n) // _elems(sh, (a,), (getattr(cfg, n),))
            for a, n in (("heads", "num_heads"), ("kv_heads", "num_kv_heads"), ("mlp", "intermediate_size"),
                         ("vocab", "vocab_size"))}


def activation_bytes(cfg: M.ModelConfig, sh: Sharder, micro_batch: int, seq: int) -> int:
    """Per device: what one micro-batch of `seq` tokens keeps for the backward pass (`kept_bytes_per_token`
    for every layer, plus, with remat, one layer's full set while it is recomputed; the final norm,
    the float32 logits and their gradient (one `loss_chunk` of tokens at a time when set), and the
    attention mask), its rows split by the batch rules and its heads, MLP width and vocabulary by the
    tensor rules."""
    rows = _elems(sh, ("batch",), (micro_batch,))
    split = tensor_split(cfg, sh)
    V, H = cfg.vocab_size, cfg.num_heads
    logits = 8 * (V // split["vocab"])  # float32 logits and their gradient, per token
    chunked = 0 < cfg.loss_chunk < seq
    final = 4 * (H // split["heads"]) * seq + norm_bytes_per_token(cfg) + (0 if chunked else logits)
    layers = cfg.num_layers * kept_bytes_per_token(cfg, seq, split)
    recompute = 0 if cfg.remat == "none" else layer_bytes_per_token(cfg, seq, split)
    return rows * (seq * (layers + recompute + final) + (cfg.loss_chunk * logits if chunked else 0))


def plan(cfg: M.ModelConfig, mesh_cfg: Mapping[str, Any], hardware: str | Hardware, micro_batch: int, seq: int,
         headroom: float = 0.9) -> Plan:
    hw = hardware_spec(hardware)
    rules = mesh_cfg.get("rules", "fsdp")
    if rules not in RULES:
        raise ValueError(f"mesh.rules={rules!r}; expected one of {sorted(RULES)}")
    shape = mesh_shape(mesh_cfg, hw.devices)
    sh = Sharder(AbstractMesh(shape, MESH_AXES), RULES[rules])
    leaves = _param_leaves(cfg)
    p, c = np.dtype(M.DTYPES[cfg.param_dtype]).itemsize, np.dtype(M.DTYPES[cfg.dtype]).itemsize
    elems = sum(_elems(sh, axes, s) for axes, s in leaves)
    tensor_only = [_elems(sh, axes, s, only=("tensor",)) for axes, s in leaves]
    layer_tp = sum(n for n, (axes, _) in zip(tensor_only, leaves) if axes[0] == "layers") // cfg.num_layers
    rows = _elems(sh, ("batch",), (micro_batch,))
    gathered = elems < sum(tensor_only)  # parameters split beyond `tensor`: FSDP gathers them layer by layer
    components = {
        "parameters": elems * p,
        "gradients": elems * (4 + p),
        "optimizer (Adam)": 2 * elems * p,
        "activations": activation_bytes(cfg, sh, micro_batch, seq),
        "weight copies": elems * c if c != p and cfg.remat == "none" else 0,  # remat recomputes the casts
        "workspace": layer_tp * (c + 4) if gathered else 0,
    }
    return Plan(hardware if isinstance(hardware, str) else hw.note, dict(zip(MESH_AXES, shape)), micro_batch, rows,
                param_count(cfg), components, int(headroom * hw.bytes_per_device))


def largest_micro_batch(cfg: M.ModelConfig, mesh_cfg: Mapping[str, Any], hardware: str | Hardware, seq: int,
                        headroom: float = 0.9, limit: int = 4096) -> int:
    """The largest micro-batch (a multiple of the batch split) that fits; 0 if not even one row per device does."""
    shape = dict(zip(MESH_AXES, mesh_shape(mesh_cfg, hardware_spec(hardware).devices)))
    step = math.prod(shape[a] for a in RULES[mesh_cfg.get("rules", "fsdp")]["batch"])
    best = 0
    for m in range(step, limit + 1, step):
        if not plan(cfg, mesh_cfg, hardware, m, seq, headroom).fits:
            break
        best = m
    return best


def suggest(cfg: M.ModelConfig, mesh_cfg: Mapping[str, Any], hardware: str | Hardware, micro_batch: int, seq: int,
            headroom: float = 0.9) -> str:
    """What to change so that a run fits, cheapest first: a remat policy and loss chunking at this
    micro-batch (dots recomputes only norms, activations and attention; full adds a forward pass),
    else a smaller micro-batch (accumulation keeps the global batch), else the smallest accelerator."""
    chunk = cfg.loss_chunk or (512 if seq > 512 else 0)
    for remat in ("none", "dots", "full"):
        for loss_chunk in dict.fromkeys((cfg.loss_chunk, chunk)):
            candidate = cfg.replace(remat=remat, loss_chunk=loss_chunk)
            if plan(candidate, mesh_cfg, hardware, micro_batch, seq, headroom).fits:
                return f"model.remat={remat!r} model.loss_chunk={loss_chunk}"
    lightest = cfg.replace(remat="full", loss_chunk=chunk)
    best = largest_micro_batch(lightest, mesh_cfg, hardware, seq, headroom)
    if best:
        return f"model.remat='full' model.loss_chunk={chunk} train.micro_batch={best}"
    for name in sorted(HARDWARE, key=lambda n: HARDWARE[n].devices * HARDWARE[n].bytes_per_device):
        if largest_micro_batch(lightest, mesh_cfg, name, seq, headroom):
            return f"a larger accelerator: {name} with model.remat='full' model.loss_chunk={chunk}"
    return "nothing listed fits: add tensor parallelism (mesh.rules='fsdp_tp', mesh.tensor > 1)"


def roofline(cfg: M.ModelConfig, params: int, hardware: str | Hardware, micro_batch: int, seq: int,
             global_batch: int) -> tuple[float, float]:
    """(seconds per optimizer step, model FLOPs utilisation) at the chips' peaks.

    Compute: 6 x parameters x tokens model FLOPs, plus one more forward (2 x parameters x tokens)
    with full remat. Memory: every micro-step streams every weight through each chip in the
    compute dtype for the forward, the backward and any recomputation (FSDP gathers them), and reads
    and writes its shard of the float32 accumulator. The step takes the longer of the two."""
    hw = hardware_spec(hardware)
    c = np.dtype(M.DTYPES[cfg.dtype]).itemsize
    tokens, micro_steps = global_batch * seq, -(-global_batch // micro_batch)
    model_flops = 6 * params * tokens
    compute = (model_flops + (2 * params * tokens if cfg.remat == "full" else 0)) / (hw.chip_count * hw.peak_flops)
    passes = 2 + (cfg.remat != "none")
    memory = micro_steps * params * (passes * c + 8 / hw.chip_count) / hw.hbm_bandwidth
    seconds = max(compute, memory)
    return seconds, model_flops / (hw.chip_count * hw.peak_flops * seconds)


def report(cfg: M.ModelConfig, name: str, mesh_cfg: Mapping[str, Any], hardware: str, micro_batch: int, seq: int,
           headroom: float = 0.9, global_batch: int = 64) -> str:
    """A human-readable plan for one accelerator, with what to change if it does not fit."""
    pl = plan(cfg, mesh_cfg, hardware, micro_batch, seq, headroom)
    hw = HARDWARE[hardware]
    gib = lambda b: f"{b / GiB:8.2f} GiB"
    mesh = " ".join(f"{a}={n}" for a, n in pl.mesh.items())
    lines = [f"{name} ({pl.params / 1e9:.2f} B parameters, {cfg.param_dtype} weights, {cfg.dtype} compute, "
             f"remat {cfg.remat}, loss chunk {cfg.loss_chunk or 'none'}) on {hardware} ({hw.note})",
             f"  mesh {mesh}, rules {mesh_cfg.get('rules', 'fsdp')}; micro-batch {micro_batch} x {seq} tokens "
             f"= {pl.rows_per_device} row(s) per device"]
    lines += [f"  {k:<18}{gib(v)}" for k, v in pl.bytes.items()]
    best = largest_micro_batch(cfg, mesh_cfg, hardware, seq, headroom)
    verdict = "fits" if pl.fits else "does NOT fit"
    lines.append(f"  {'total':<18}{gib(pl.total)}  of {gib(pl.usable).strip()} usable "
                 f"({headroom:.0%} of {hw.bytes_per_device / GiB:.0f} GiB): {verdict}; "
                 f"largest micro-batch that fits at this length: {best or 'none'}")
    if not pl.fits:
        lines.append(f"  to fit: {suggest(cfg, mesh_cfg, hardware, micro_batch, seq, headroom)}")
    seconds, mfu = roofline(cfg, pl.params, hardware, micro_batch, seq, global_batch)
    lines.append(f"  roofline: {seconds:.2f} s per optimizer step of {global_batch} x {seq} tokens, MFU {mfu:.0%} "
                 f"(at {hw.peak_flops / 1e12:.0f} TFLOP/s and {hw.hbm_bandwidth / 1e9:.0f} GB/s per chip)")
    return "\n".join(lines)


def run(cfg) -> str | None:
    """The plan of `cfg` (a planner or training config) on `cfg.hardware` ("all": every accelerator known), or
    with `compile_for` the compiler's own figures for a TPU target (exit status 1 when a program does not fit)."""
    model = model_config(cfg.model.path, cfg.model.param_dtype, cfg.model.dtype).replace(**memory.options(cfg.model))
    if cfg.compile_for:
        from jax_implicit import aot

        if status := aot.main(cfg, model):
            raise SystemExit(status)
        return None
    if cfg.hardware != "all" and cfg.hardware not in HARDWARE:
        raise ValueError(f"hardware={cfg.hardware!r}; expected 'all' or one of {sorted(HARDWARE)}")
    names = sorted(HARDWARE) if cfg.hardware == "all" else [cfg.hardware]
    return "\n".join(report(model, cfg.model.path, cfg.mesh, hw, cfg.train.micro_batch, cfg.data.max_seq_length,
                            cfg.headroom, cfg.train.global_batch) for hw in names)


if __name__ == "__main__":
    from jax_implicit import cli

    # A training config lacks the planner's own settings: they come from configs/plan.py's defaults.
    own = cli.load("configs/plan.py")
    cli.main(run, "configs/plan.py", extra={k: own[k] for k in ("hardware", "headroom", "compile_for", "decode")})
