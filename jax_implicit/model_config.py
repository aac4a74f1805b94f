"""The model's shape and switches (`ModelConfig`), read from and written to HF `config.json` files.

One dataclass covers Llama-2, Llama-family GQA models, OLMo and Gemma 3 (text): what differs between them is
a handful of switches (norm kind, activation, q/k norms, post-norms, embedding scale, per-layer sliding
windows and RoPE bases), validated here so a bad config fails before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jax_implicit import memory

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "olmo", "gemma3_text")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("rms", "layernorm", "gemma_rms")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    norm: str = "rms"  # "rms": learned scale (Llama); "layernorm": no scale, no bias (OLMo); "gemma_rms": 1 + scale
    norm_eps: float = 1e-5
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and logits stay float32
    # Gemma 3 switches; the defaults are Llama's.
    activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm of queries and keys over head_dim, before RoPE
    post_norms: bool = False  # norms on the attention and MLP outputs, before the residual add
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # softmax scale is 1/sqrt(this); None: head_dim
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES; () means all full attention
    sliding_window: int | None = None  # a sliding layer's query sees keys fewer than this many slots back
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (None: rope_theta)
    remat: str = "none"  # rematerialisation policy of the layer scan (memory.REMAT_POLICIES)
    loss_chunk: int = 0  # tokens per chunk of the training loss (memory.cross_entropy_sum); 0: all at once
    # LoRA (`lora.py` adds the adapter weights): the delta's alpha / rank, and the dropout on its input.
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {sorted(DTYPES)}")
        if self.remat not in memory.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {tuple(memory.REMAT_POLICIES)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; expected one of {NORMS}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation={self.activation!r}; expected 'silu' or 'gelu_tanh'")
        if (self.qk_norm or self.post_norms) and self.norm == "layernorm":
            raise ValueError("qk_norm and post_norms need a learned norm (norm='rms' or 'gemma_rms')")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
        if bad := sorted(set(self.layer_types) - set(LAYER_TYPES)):
            raise ValueError(f"layer_types: unknown {bad}; expected {LAYER_TYPES}")
        if any(self.sliding_layers) and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"sliding_attention layers need sliding_window > 0, got {self.sliding_window!r}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use sliding-window attention (and the local RoPE base)?"""
        return tuple(t == "sliding_attention" for t in self.layer_types) or (False,) * self.num_layers

    @property
    def rope_bases(self) -> tuple[float, ...]:
        """RoPE bases: the global one, then the local one if the sliding layers have their own."""
        return (self.rope_theta,) if self.rope_local_theta is None else (self.rope_theta, self.rope_local_theta)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _rope_theta(params: dict, default: float, where: str = "") -> float:
    """The base of one HF rope-parameters dict; any RoPE scaling is refused."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope scaling {kind!r}{where} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", default))


def _gemma3_fields(hf: dict) -> dict:
    """The Gemma 3 switches, with transformers' defaults for keys a config.json leaves out."""
    rope = hf.get("rope_parameters") or {}
    pattern = hf.get("sliding_window_pattern", 6)
    layer_types = hf.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                            for i in range(hf["num_hidden_layers"])]
    return dict(
        norm="gemma_rms", activation="gelu_tanh", qk_norm=True, post_norms=True, scale_embeddings=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        layer_types=tuple(layer_types), sliding_window=hf.get("sliding_window", 4096),
        rope_theta=_rope_theta({**(rope.get("full_attention") or {}), **(hf.get("rope_scaling") or {})},
                               hf.get("rope_theta", 1e6), " on full_attention layers"),
        rope_local_theta=_rope_theta(rope.get("sliding_attention") or {}, hf.get("rope_local_base_freq", 1e4),
                                     " on sliding_attention layers"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def from_hf_config(hf: dict | str | Path, *, param_dtype: str = "float32", dtype: str = "float32") -> ModelConfig:
    """Build a ModelConfig from an HF `config.json` (dict, file or model directory).

    Every HF option that changes the computation and that this model cannot represent raises,
    so an unsupported checkpoint never loads with a silent default.
    """
    if not isinstance(hf, dict):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no HF config at {path}")
        hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise ValueError("config.json: model_type 'gemma3' is the multimodal Gemma 3 checkpoint; only its text model "
                         "is supported (model_type 'gemma3_text', Gemma3ForCausalLM, e.g. Gemma-3-270M/1B)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    gemma = model_type == "gemma3_text"
    unsupported = {
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "qk_layernorm": (hf.get("qk_layernorm", False), False),
    }
    if gemma:
        unsupported |= {
            "hidden_activation": (hf.get("hidden_activation", "gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
            "attn_logit_softcapping": (hf.get("attn_logit_softcapping"), None),
            "final_logit_softcapping": (hf.get("final_logit_softcapping"), None),
            "use_bidirectional_attention": (bool(hf.get("use_bidirectional_attention")), False),
        }
    else:
        unsupported |= {
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
            "sliding_window": (hf.get("sliding_window") if hf.get("use_sliding_window", True) else None, None),
        }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"config.json: {key}={value!r} is not supported (expected {expected!r})")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    heads = hf["num_attention_heads"]
    fields = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm="layernorm" if model_type == "olmo" else "rms",
        norm_eps=1e-5 if model_type == "olmo" else hf.get("rms_norm_eps", 1e-6),
        clip_qkv=hf.get("clip_qkv"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=param_dtype,
        dtype=dtype,
    )
    if gemma:
        return ModelConfig(**fields | _gemma3_fields(hf))
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    return ModelConfig(**fields, rope_theta=_rope_theta(rope, hf.get("rope_theta", 10000.0)))


def to_hf_config(cfg: ModelConfig) -> dict:
    """The HF `config.json` that transformers needs to rebuild this model."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "olmo": "OlmoForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM"}[cfg.model_type]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else (cfg.eos_token_ids or [None])[0],
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.model_type == "gemma3_text":
        del out["hidden_act"], out["rope_theta"]
        rope = lambda theta: {"rope_type": "default", "rope_theta": theta}
        out |= {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": cfg.norm_eps,
                "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "sliding_window": cfg.sliding_window,
                "layer_types": list(cfg.layer_types) or ["full_attention"] * cfg.num_layers,
                "rope_parameters": {"full_attention": rope(cfg.rope_theta),
                                    "sliding_attention": rope(cfg.rope_bases[-1])},
                "attn_logit_softcapping": None, "final_logit_softcapping": None}
    elif cfg.model_type == "olmo":
        out["clip_qkv"] = cfg.clip_qkv
    else:
        out["rms_norm_eps"] = cfg.norm_eps
        out["mlp_bias"] = False
    if cfg.model_type == "mistral":
        out["sliding_window"] = None
    return out
