"""LoRA and QLoRA on the shared decoder, with HF peft adapters and merged HF folders as exports.

What was chosen, and why: the adapter weights are `nnx.LoRAParam`s set on the decoder's stacked `Layers`
(A: (layers, *in, rank), B: (layers, rank, *out)), and `projection.project` adds
`scale * dropout(x) A B` to each targeted einsum. Training filters on that param type (the tunix way):
the optimizer sees only LoRAParams, everything else is frozen. `nnx.LoRA` was not used because it
wraps one 2-D `Linear`, while our projections are multi-axis einsums over weights stacked for
`lax.scan`; `qwix.LoraProvider` intercepts einsums to inject its own params and quantises with its own
layouts, which neither matches bitsandbytes' NF4 blocks (so RT's QLoRA numbers could not be compared)
nor keeps peft's A/B under names and logical axes we control. The delta's axes are the base weight's:
A carries the base's input axes, B its output axes, so both shard like their base weight; the rank
axis (`lora_rank`) is in no rule table, so it is never split.

QLoRA (`quant` "nf4" or "int8") stores every projection's base weight quantised (`quant.py`, in
transformers' (out, in) layout, so NF4 blocks are bitsandbytes') and dequantises it on the fly in the
compute dtype; adapters stay float32, as peft keeps them after `prepare_model_for_kbit_training`.

Exports: `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained` loads onto the transformers base model; `merged` folds the deltas into
the base weights (RT's `lora_merge.py`) for `convert.export_hf`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jax_implicit import convert, files, quant
from jax_implicit import model as M
from jax_implicit.projection import QUANT_PREFIX, SPECS, from_matrix, io_shapes, to_matrix

TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
           "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}  # peft target name -> ours
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
QUANTS = ("none", *quant.KINDS)
PEFT_PREFIX = "base_model.model.model.layers"


class QuantizedWeight(nnx.Param):
    """One part of a quantised base weight (codes or scales): frozen, never trained."""


def lora_config(rank: int = 0, alpha: float = 16.0, dropout: float = 0.0,
                targets: tuple[str, ...] = tuple(TARGETS), quant: str = "none") -> ConfigDict:
    """`rank` 0: no adapters (full finetuning). `targets`: peft module names; `quant`: the base weights'
    storage, "none", "nf4" (QLoRA) or "int8"."""
    return ConfigDict(dict(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets), quant=quant))


def check(lcfg: ConfigDict) -> None:
    """Impossible LoRA settings, with the key named."""
    bad = [t for t in lcfg.targets if t not in TARGETS]
    checks = [
        (lcfg.rank >= 0, f"lora.rank={lcfg.rank} must be >= 0"),
        (not bad, f"lora.targets: unknown {bad}; expected some of {tuple(TARGETS)}"),
        (lcfg.rank == 0 or len(lcfg.targets) > 0, "lora.targets is empty"),
        (0 <= lcfg.dropout < 1, f"lora.dropout={lcfg.dropout} must be in [0, 1)"),
        (lcfg.quant in QUANTS, f"lora.quant={lcfg.quant!r}; expected one of {QUANTS}"),
        (lcfg.quant == "none" or lcfg.rank > 0, f"lora.quant={lcfg.quant!r} needs lora.rank > 0 (QLoRA)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_model(cfg: M.ModelConfig, lcfg: ConfigDict) -> None:
    """Settings this model cannot take: quantisation needs every projection's input size divisible by 64."""
    if lcfg.rank and lcfg.quant != "none":
        for name in SPECS:
            n = math.prod(io_shapes(cfg, name)[0])
            if n % quant.BLOCK:
                raise ValueError(f"lora.quant={lcfg.quant!r} needs every projection's input size divisible by "
                                 f"{quant.BLOCK}; {HF_MODULES[name]} has {n}")


def _n_in(name: str) -> int:
    return len(SPECS[name].split(",")[0]) - 2  # x is (b, t, *in)


def apply(decoder: M.Decoder, lcfg: ConfigDict, seed: int = 0) -> M.Decoder:
    """Add adapters to `decoder` (in place, and returned) and quantise its projections if `lcfg.quant` says so.

    A is initialised as peft does (uniform in +-1/sqrt(fan_in), torch's kaiming_uniform(a=sqrt(5))) and B
    to zeros, so the adapted model starts equal to the base. Traceable: works under `nnx.eval_shape`.
    """
    check(lcfg)
    if lcfg.rank == 0:
        return decoder
    cfg = decoder.cfg
    decoder.cfg = cfg.replace(lora_scale=lcfg.alpha / lcfg.rank, lora_dropout=float(lcfg.dropout))
    layers, L, r = decoder.layers, cfg.num_layers, lcfg.rank
    key = jax.random.PRNGKey(seed)
    for hf_name in lcfg.targets:
        name = TARGETS[hf_name]
        axes, n_in = getattr(layers, name).get_metadata()["axes"], _n_in(name)
        ins, outs = io_shapes(cfg, name)
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(jax.random.fold_in(key, list(SPECS).index(name)), (L, *ins, r), jnp.float32, -bound, bound)
        setattr(layers, name + "_lora_a", nnx.LoRAParam(a, axes=("layers", *axes[1:1 + n_in], "lora_rank")))
        setattr(layers, name + "_lora_b", nnx.LoRAParam(jnp.zeros((L, r, *outs), jnp.float32),
                                                        axes=("layers", "lora_rank", *axes[1 + n_in:])))
    if lcfg.quant != "none":
        for name in SPECS:  # like bitsandbytes' load_in_4bit: every projection, targeted or not
            base, n_in = getattr(layers, name), _n_in(name)
            axes = base.get_metadata()["axes"]
            out_axis, in_axis = axes[1 + n_in], axes[1]
            parts = jax.vmap(lambda w: quant.quantize(to_matrix(w, n_in), lcfg.quant))(base[...])
            delattr(layers, name)
            for part, value in parts.items():
                part_axes = ("layers", out_axis, in_axis)[:value.ndim] if value.ndim != 2 else ("layers", "scale_blocks")
                setattr(layers, name + QUANT_PREFIX + part, QuantizedWeight(value, axes=part_axes))
    return decoder


def abstract(cfg: M.ModelConfig, lcfg: ConfigDict) -> M.Decoder:
    """The decoder with its adapters (and quantised weights) as `ShapeDtypeStruct`s, allocating nothing."""
    return nnx.eval_shape(lambda: apply(M.Decoder(cfg, rngs=nnx.Rngs(0)), lcfg))


def with_adapters(decoder: M.Decoder, lcfg: ConfigDict, adapters: dict) -> M.Decoder:
    """`decoder` (plain base weights) carrying the trained `adapters` (a pure dict as `split` returns them):
    RT merges the QLoRA adapter into the unquantised base, so exports start from this."""
    apply(decoder, ConfigDict({**lcfg.to_dict(), "quant": "none"}))
    state = nnx.state(decoder, nnx.LoRAParam)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(decoder, state)
    return decoder


def adapted(decoder: M.Decoder) -> list[str]:
    """Our names of the projections that carry adapters."""
    return [n for n in SPECS if hasattr(decoder.layers, n + "_lora_a")]


def split(decoder: M.Decoder) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable adapter weights, frozen rest) as pure dicts; `combine` joins them for `nnx.merge`."""
    graphdef = nnx.split(decoder)[0]
    return graphdef, nnx.to_pure_dict(nnx.state(decoder, nnx.LoRAParam)), nnx.to_pure_dict(
        nnx.state(decoder, nnx.Not(nnx.LoRAParam)))


def combine(frozen: dict, trainable: dict) -> dict:
    """One nested dict holding both parts (`trainable` wins where both have a key)."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


# ----------------------------------------------------------------------------- merge and export


def merged(decoder: M.Decoder) -> M.Decoder:
    """A plain decoder with each adapter folded in (W + scale * A B, computed in float32, stored in the
    param dtype) and quantised weights dequantised: what `convert.export_hf` writes for AlpacaEval."""
    cfg = decoder.cfg
    plain = cfg.replace(lora_scale=1.0, lora_dropout=0.0)
    state = nnx.to_pure_dict(nnx.state(decoder))
    layers = state["layers"]
    pdt = M.DTYPES[cfg.param_dtype]
    for name in SPECS:
        w = layers.pop(name, None)
        parts = {k[len(name + QUANT_PREFIX):]: layers.pop(k) for k in list(layers) if k.startswith(name + QUANT_PREFIX)}
        if w is None:
            w = jax.vmap(lambda q: from_matrix(quant.dequantize(q, jnp.float32), *io_shapes(cfg, name)))(parts)
        w = w.astype(jnp.float32)
        if name + "_lora_a" in layers:
            a, b = layers.pop(name + "_lora_a"), layers.pop(name + "_lora_b")
            n_in = _n_in(name)
            delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(*b.shape[:2], -1))
            w = w + cfg.lora_scale * delta.reshape(w.shape[0], *w.shape[1:1 + n_in], *w.shape[1 + n_in:])
        layers[name] = w.astype(pdt)
    return nnx.merge(nnx.split(M.abstract(plain))[0], state)


def peft_tensors(decoder: M.Decoder) -> dict[str, np.ndarray]:
    """The adapters under peft's names: lora_A (rank, in) and lora_B (out, rank) per layer and module."""
    out = {}
    for name in adapted(decoder):
        a = convert._to_host(getattr(decoder.layers, name + "_lora_a")[...])
        b = convert._to_host(getattr(decoder.layers, name + "_lora_b")[...])
        for i in range(decoder.cfg.num_layers):
            prefix = f"{PEFT_PREFIX}.{i}.{HF_MODULES[name]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T, np.float32)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T, np.float32)
    return out


def export_peft(decoder: M.Decoder, lcfg: ConfigDict, out: str | Path, base_model: str = "") -> Path:
    """Write a peft adapter folder; every process calls this (arrays are gathered), process 0 writes."""
    from safetensors.numpy import save_file

    tensors = peft_tensors(decoder)
    if jax.process_index() != 0:
        return Path(out)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
              "target_modules": sorted(lcfg.targets), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    with files.atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)


def load_peft(decoder: M.Decoder, folder: str | Path, quant_kind: str = "none") -> M.Decoder:
    """Add the adapters of a peft LoRA folder to `decoder` (in place, and returned)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json (not a peft adapter folder)")
    config = json.loads((folder / "adapter_config.json").read_text())
    unsupported = {k: config.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out") if config.get(k)}
    if config.get("peft_type") != "LORA" or unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"{folder}/adapter_config.json: only plain LoRA (bias 'none') is supported, got "
                         f"peft_type={config.get('peft_type')!r} {unsupported or ''} bias={config.get('bias')!r}")
    targets = config["target_modules"]
    targets = tuple(TARGETS) if targets == "all-linear" else tuple(t for t in TARGETS if t in targets)
    lcfg = lora_config(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets, quant_kind)
    apply(decoder, lcfg)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for name in adapted(decoder):
        ins, outs = io_shapes(decoder.cfg, name)
        a, b = [], []
        for i in range(decoder.cfg.num_layers):
            prefix = f"{PEFT_PREFIX}.{i}.{HF_MODULES[name]}"
            try:
                a.append(tensors[f"{prefix}.lora_A.weight"].T.reshape(*ins, lcfg.rank))
                b.append(tensors[f"{prefix}.lora_B.weight"].T.reshape(lcfg.rank, *outs))
            except KeyError as e:
                raise ValueError(f"{folder}/adapter_model.safetensors lacks {e.args[0]}") from None
        for suffix, value in (("_lora_a", a), ("_lora_b", b)):
            var = getattr(decoder.layers, name + suffix)
            var[...] = jnp.asarray(np.stack(value), jnp.float32)
    return decoder
