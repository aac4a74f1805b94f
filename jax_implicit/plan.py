"""Memory planner: per-device bytes of a training run for a model, a mesh and an accelerator, and whether it fits.

    python -m jax_implicit.plan --config=configs/plan.py:llama2_7b
    python -m jax_implicit.plan --config=configs/train/paper.py:olmo_7b,response --config.mesh.fsdp=-1 --config.mesh.data=1

Reads `model` (HF folder, or a hub id of PRESETS), `mesh`, `data.max_seq_length`, `train.micro_batch`
and, if present, `hardware` (a HARDWARE name or "all") and `headroom`. Shards are computed with the
same rule tables as the real run (`sharding.Sharder` on an abstract mesh), so the figures follow them.

What a device holds, as `train.py` runs (float32 accumulator, optax Adam, no rematerialisation):
- parameters, param dtype;
- gradients: the float32 accumulator plus one micro-batch's gradient (param dtype);
- optimizer state: Adam's two moments, param dtype (optax's default);
- activations saved for the backward pass of one micro-batch, per layer and token (`layer_bytes_per_token`,
  checked against the residuals `jax.vjp` keeps for this model), plus the final norm, the float32 logits
  and their gradient, and the attention mask;
- weight copies: the compute-dtype casts of the weights that the backward pass keeps (none when the
  compute dtype is the param dtype);
- workspace: with FSDP, one layer's weights gathered (compute dtype) and its float32 gradient.
A run fits when the total is at most `headroom` (default 0.9) of the device memory: the rest is left
to XLA's temporaries, fragmentation and the runtime.
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

from jax_implicit import model as M
from jax_implicit.sharding import MESH_AXES, RULES, Sharder, mesh_shape

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
    devices: int  # JAX devices in the slice / host
    bytes_per_device: int
    note: str


HARDWARE = {
    "tpu-v4-8": Hardware(4, 32 * GiB, "TPU v4-8: 4 chips (one JAX device each, megacore), 32 GiB HBM per chip"),
    "tpu-v5e-8": Hardware(8, 16 * GiB, "TPU v5e-8 (v5litepod-8): 8 chips, 16 GiB HBM per chip"),
    "gpu-8x80gb": Hardware(8, 80 * GiB, "one host with 8 x 80 GB GPUs (A100/H100 80GB)"),
}

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
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
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


def activation_bytes(cfg: M.ModelConfig, sh: Sharder, micro_batch: int, seq: int) -> int:
    """Per device: what one micro-batch of `seq` tokens keeps for the backward pass (`layer_bytes_per_token`
    for every layer, plus the final norm, the float32 logits and their gradient, and the attention mask),
    its rows split by the batch rules and its heads, MLP width and vocabulary by the tensor rules."""
    rows = _elems(sh, ("batch",), (micro_batch,))
    split = {a: getattr(cfg, n) // _elems(sh, (a,), (getattr(cfg, n),))
             for a, n in (("heads", "num_heads"), ("kv_heads", "num_kv_heads"), ("mlp", "intermediate_size"),
                          ("vocab", "vocab_size"))}
    V, H = cfg.vocab_size, cfg.num_heads
    final = 4 * (H // split["heads"]) * seq + norm_bytes_per_token(cfg) + 8 * (V // split["vocab"])
    return rows * seq * (cfg.num_layers * layer_bytes_per_token(cfg, seq, split) + final)


def plan(cfg: M.ModelConfig, mesh_cfg: Mapping[str, Any], hardware: str, micro_batch: int, seq: int,
         headroom: float = 0.9) -> Plan:
    if hardware not in HARDWARE:
        raise ValueError(f"hardware={hardware!r}; expected one of {sorted(HARDWARE)}")
    rules = mesh_cfg.get("rules", "fsdp")
    if rules not in RULES:
        raise ValueError(f"mesh.rules={rules!r}; expected one of {sorted(RULES)}")
    hw = HARDWARE[hardware]
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
        "weight copies": elems * c if c != p else 0,
        "workspace": layer_tp * (c + 4) if gathered else 0,
    }
    return Plan(hardware, dict(zip(MESH_AXES, shape)), micro_batch, rows, param_count(cfg), components,
                int(headroom * hw.bytes_per_device))


def largest_micro_batch(cfg: M.ModelConfig, mesh_cfg: Mapping[str, Any], hardware: str, seq: int,
                        headroom: float = 0.9, limit: int = 4096) -> int:
    """The largest micro-batch (a multiple of the batch split) that fits; 0 if not even one row per device does."""
    shape = dict(zip(MESH_AXES, mesh_shape(mesh_cfg, HARDWARE[hardware].devices)))
    step = math.prod(shape[a] for a in RULES[mesh_cfg.get("rules", "fsdp")]["batch"])
    best = 0
    for m in range(step, limit + 1, step):
        if not plan(cfg, mesh_cfg, hardware, m, seq, headroom).fits:
            break
        best = m
    return best


def report(cfg: M.ModelConfig, name: str, mesh_cfg: Mapping[str, Any], hardware: str, micro_batch: int, seq: int,
           headroom: float = 0.9) -> str:
    """A human-readable plan for one accelerator."""
    pl = plan(cfg, mesh_cfg, hardware, micro_batch, seq, headroom)
    gib = lambda b: f"{b / GiB:8.2f} GiB"
    mesh = " ".join(f"{a}={n}" for a, n in pl.mesh.items())
    lines = [f"{name} ({pl.params / 1e9:.2f} B parameters, {cfg.param_dtype} weights, {cfg.dtype} compute) on "
             f"{hardware} ({HARDWARE[hardware].note})",
             f"  mesh {mesh}, rules {mesh_cfg.get('rules', 'fsdp')}; micro-batch {micro_batch} x {seq} tokens "
             f"= {pl.rows_per_device} row(s) per device"]
    lines += [f"  {k:<18}{gib(v)}" for k, v in pl.bytes.items()]
    best = largest_micro_batch(cfg, mesh_cfg, hardware, seq, headroom)
    verdict = "fits" if pl.fits else "does NOT fit"
    lines.append(f"  {'total':<18}{gib(pl.total)}  of {gib(pl.usable).strip()} usable "
                 f"({headroom:.0%} of {HARDWARE[hardware].bytes_per_device / GiB:.0f} GiB): {verdict}; "
                 f"largest micro-batch that fits at this length: {best or 'none'}")
    return "\n".join(lines)


def run(cfg) -> str:
    """The plan of `cfg` (a planner or training config) on `cfg.hardware` ("all": every accelerator known)."""
    model = model_config(cfg.model.path, cfg.model.param_dtype, cfg.model.dtype)
    if cfg.hardware != "all" and cfg.hardware not in HARDWARE:
        raise ValueError(f"hardware={cfg.hardware!r}; expected 'all' or one of {sorted(HARDWARE)}")
    names = sorted(HARDWARE) if cfg.hardware == "all" else [cfg.hardware]
    return "\n".join(report(model, cfg.model.path, cfg.mesh, hw, cfg.train.micro_batch, cfg.data.max_seq_length,
                            cfg.headroom) for hw in names)


if __name__ == "__main__":
    from jax_implicit import cli

    # A training config lacks the planner's own settings; they are added with these defaults.
    cli.main(run, "configs/plan.py", extra=dict(hardware="all", headroom=0.9))
