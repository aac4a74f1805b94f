"""One decoder-only transformer for Llama-2, Llama-family GQA models, OLMo and Gemma 3 (text), in Flax NNX.

Why NNX rather than Linen: parameters are plain `nnx.Param` arrays that carry their logical
axes as metadata, declared once in `Decoder.__init__`; `nnx.split` turns the model into a
(graphdef, state) pair, so the train and decode steps are pure jitted functions over a pytree
that orbax saves and `jax.jit` shards directly. Layers are stacked on a leading `layers` axis
and run under `jax.lax.scan`, so compile time does not grow with depth. Decoding runs the layers as a
Python loop over a KV cache with one buffer per layer, and `unstack` gives each layer's weights a buffer of
its own for it (MaxText's `scan_layers=False` for inference).

Numerics follow transformers' PyTorch classes: RMSNorm and the non-parametric LayerNorm in
float32, RoPE in HF's rotate-half layout (no q/k permutation on import), softmax in float32.
Gemma 3 is a set of config switches on the same decoder (norm kind, activation, q/k norms,
post-norms, embedding scale); its per-layer differences (sliding-window vs global attention, two
RoPE bases) are a flag array indexed by layer, not Python branches per layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_implicit import memory, pinning
from jax_implicit.model_config import DTYPES, ModelConfig, from_hf_config, to_hf_config  # noqa: F401 -- M.*
from jax_implicit.projection import project

# ----------------------------------------------------------------------------- the model


class Layers(nnx.Module):
    """All decoder layers, stacked on a leading `layers` axis for `lax.scan`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, F, H, K, Dh = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
                             cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        pdt = DTYPES[cfg.param_dtype]
        normal = lambda shape, fan_in: (jax.random.normal(rngs.params(), shape, pdt) / math.sqrt(fan_in))
        norm = lambda shape: _norm_init(cfg, shape)
        self.wq = nnx.Param(normal((L, D, H, Dh), D), axes=("layers", "embed", "heads", "head_dim"))
        self.wk = nnx.Param(normal((L, D, K, Dh), D), axes=("layers", "embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(normal((L, D, K, Dh), D), axes=("layers", "embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(normal((L, H, Dh, D), H * Dh), axes=("layers", "heads", "head_dim", "embed"))
        self.w_gate = nnx.Param(normal((L, D, F), D), axes=("layers", "embed", "mlp"))
        self.w_up = nnx.Param(normal((L, D, F), D), axes=("layers", "embed", "mlp"))
        self.w_down = nnx.Param(normal((L, F, D), F), axes=("layers", "mlp", "embed"))
        if cfg.norm != "layernorm":
            self.attn_norm = nnx.Param(norm((L, D)), axes=("layers", "norm"))
            self.mlp_norm = nnx.Param(norm((L, D)), axes=("layers", "norm"))
        if cfg.post_norms:
            self.attn_post_norm = nnx.Param(norm((L, D)), axes=("layers", "norm"))
            self.mlp_post_norm = nnx.Param(norm((L, D)), axes=("layers", "norm"))
        if cfg.qk_norm:
            self.q_norm = nnx.Param(norm((L, Dh)), axes=("layers", "head_dim"))
            self.k_norm = nnx.Param(norm((L, Dh)), axes=("layers", "head_dim"))

    def weights(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}

    def each(self) -> list[dict[str, jax.Array]]:
        """Layer i's weights for i in order: slices of the stacks."""
        w = self.weights()
        return [{k: v[i] for k, v in w.items()} for i in range(self.wq.shape[0])]


class LayerList(nnx.Module):
    """`Layers`' weights with one buffer per layer (`unstack`), for decoding. A layer read out of the stacks
    inside the decoding loop is a copy on XLA:CPU (about 40% of a batch-16 SmolLM2 step went to these
    copies); a layer's own buffer is read in place."""

    def __init__(self, layers: Layers):
        stacked = {k: v for k, v in vars(layers).items() if isinstance(v, nnx.Param)}
        self.layers = nnx.List([nnx.Dict({k: nnx.Param(_layer_of(v[...], i), axes=v.get_metadata()["axes"][1:])
                                          for k, v in stacked.items()}) for i in range(layers.wq.shape[0])])

    def each(self) -> list[dict[str, jax.Array]]:
        return [{k: v[...] for k, v in layer.items()} for layer in self.layers]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """A fixed-size cache: slot j of a row holds that row's j-th written token. `index` is the next slot to
    write, shared by a left-padded batch (shape ()) or per row (shape (batch,), continuous batching, where
    rows hold different prompts at different stages). `valid` marks slots that hold real tokens, so padding
    and a previous occupant's stale slots are never attended.

    Keys and values are stored (kv_heads, slots, head_dim) per row, the layout the attention dots read
    directly, so a decoding step never transposes the cache; and one buffer per layer, since a layer's slice
    of a stacked cache is copied out at every step on XLA:CPU when the layers are not scanned."""

    k: tuple[jax.Array, ...]  # per layer (batch, kv_heads, max_len, head_dim)
    v: tuple[jax.Array, ...]
    valid: jax.Array  # (batch, max_len) bool
    index: jax.Array  # () or (batch,) int32: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, per_row: bool = False) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, DTYPES[cfg.dtype]) for _ in range(cfg.num_layers))
        index = jnp.zeros(batch if per_row else (), jnp.int32)
        return cls(zeros, tuple(jnp.zeros_like(z) for z in zeros), jnp.zeros((batch, max_len), bool), index)

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def logical_axes(self) -> "KVCache":
        """Each array's logical axes, shaped like the cache: a per-row `index` lies along the batch."""
        kv = ("batch", "kv_heads", "cache_seq", "head_dim")
        return KVCache((kv,) * len(self.k), (kv,) * len(self.v), ("batch", "cache_seq"),
                       ("batch",) * len(jnp.shape(self.index)))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D), pdt) * 0.02, axes=("vocab", "embed"))
        self.layers = Layers(cfg, rngs)
        if cfg.norm != "layernorm":
            self.final_norm = nnx.Param(_norm_init(cfg, (D,)), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(jax.random.normal(rngs.params(), (V, D), pdt) / math.sqrt(D), axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache | None = None,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits (float32) for `tokens` (batch, seq): `hidden` then the output embedding."""
        x, cache = self.hidden(tokens, positions, mask, cache, dropout_key)
        dt = DTYPES[self.cfg.dtype]
        logits = jnp.einsum("btd,vd->btv", x, self.head()[...].astype(dt), preferred_element_type=jnp.float32)
        return pinning.constrain(logits, ("batch", "seq", "vocab")), cache

    def head(self) -> nnx.Param:
        """The output embedding (vocab, embed): the input embedding when tied."""
        return self.embed if self.cfg.tie_word_embeddings else self.lm_head

    def hidden(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final-norm outputs (batch, seq, embed) in the compute dtype, before the output embedding
        (so a loss can apply the head in chunks: `memory.cross_entropy_sum`).

        `positions` are the RoPE positions, `mask` is True on real tokens. Without a cache every token
        attends causally to the real tokens of its own sequence; with one, the new keys are written at
        `cache.index` and every token attends to the real tokens in the slots up to its own.
        Sliding-window layers also drop keys `sliding_window` or more slots back: within a row, real
        tokens fill consecutive slots, so slot distance is position distance.
        `dropout_key` turns on LoRA dropout (training); without it the forward is deterministic.
        """
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        x = self.embed[...].astype(dt)[tokens]
        if cfg.scale_embeddings:  # in the compute dtype, like HF's Gemma
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(dt)
        x = pinning.constrain(x, ("batch", "seq", None))
        seq = tokens.shape[1]
        if cache is None:
            key_valid, q_slot = mask, jnp.arange(seq)
        else:
            valid = _write_slots(cache.valid, mask, cache.index)
            key_valid, q_slot = valid, cache.index[..., None] + jnp.arange(seq)  # (T,) or per row (B, T)
        q_slot = jnp.broadcast_to(q_slot, tokens.shape)
        k_slot = jnp.arange(key_valid.shape[1])
        attend = (k_slot[None, None, :] <= q_slot[:, :, None]) & key_valid[:, None, :]  # (B, T, S)
        near = q_slot[:, :, None] - k_slot < (cfg.sliding_window or 0)  # (B, T, S): inside the window
        tables = [rope_tables(positions, cfg.head_dim, theta, dt) for theta in cfg.rope_bases]
        cos, sin = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])  # (bases, B, T, Dh)

        sliding = jnp.asarray(cfg.sliding_layers)

        def layer(x, w, i, kv):
            rope = sliding[i].astype(jnp.int32) * (len(tables) - 1)  # the local base if there is one
            x, kv = _block(cfg, w, x, cos[rope], sin[rope], jnp.where(sliding[i], attend & near, attend), kv,
                           None if cache is None else cache.index)
            return pinning.constrain(x, ("batch", "seq", None)), kv

        layer = memory.remat(layer, cfg.remat)
        dropout = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
        if cache is None and isinstance(self.layers, Layers):  # training and scoring: one scanned layer
            weights = self.layers.weights() | ({} if dropout is None else {"lora_key": dropout})
            x, _ = jax.lax.scan(lambda x, xs: (layer(x, *xs, None)[0], None), x,
                                (weights, jnp.arange(cfg.num_layers)))
        else:  # decoding: each layer reads and writes its own cache buffer
            kv_out = []
            for i, w in enumerate(self.layers.each()):
                w = w if dropout is None else w | {"lora_key": dropout[i]}
                x, kv = layer(x, w, i, None if cache is None else (cache.k[i], cache.v[i]))
                kv_out.append(kv)
            if cache is not None:
                cache = KVCache(*(tuple(c) for c in zip(*kv_out)), valid, cache.index + seq)
        x = _norm(cfg, x, self.final_norm[...] if cfg.norm != "layernorm" else None)
        return x.astype(dt), cache


# ----------------------------------------------------------------------------- pure pieces


def _norm_init(cfg: ModelConfig, shape: tuple[int, ...]) -> jax.Array:
    """The identity scale: Gemma stores `scale - 1`."""
    return (jnp.zeros if cfg.norm == "gemma_rms" else jnp.ones)(shape, DTYPES[cfg.param_dtype])


def _norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array | None) -> jax.Array:
    h = x.astype(jnp.float32)
    if cfg.norm != "layernorm":
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
        if cfg.norm == "gemma_rms":  # Gemma scales in float32, then casts (Llama casts, then scales)
            return (h * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * h.astype(x.dtype)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + cfg.norm_eps)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (batch, seq, head_dim) in HF's rotate-half layout, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _block(cfg: ModelConfig, w: dict, x: jax.Array, cos, sin, attend, kv, index):
    h = _norm(cfg, x, w.get("attn_norm"))
    q, k, v = (project(cfg, w, name, h) for name in ("wq", "wk", "wv"))
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    if cfg.qk_norm:
        q, k = _norm(cfg, q, w["q_norm"]), _norm(cfg, k, w["k_norm"])
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    if kv is None:
        attn = _attention(q, k, v, attend, scalar)
    else:  # kv: this layer's cache (B, K, S, Dh) for keys and values; index: the first slot(s) to write
        kv = tuple(_write_layer(c, new, index) for c, new in zip(kv, (k, v)))
        attn = _cached_attention(q, *kv, attend, scalar)
    post = (lambda y, name: _norm(cfg, y, w[name])) if cfg.post_norms else (lambda y, name: y)
    x = x + post(project(cfg, w, "wo", attn), "attn_post_norm")
    h = _norm(cfg, x, w.get("mlp_norm"))
    gate, up = project(cfg, w, "w_gate", h), project(cfg, w, "w_up", h)
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return x + post(project(cfg, w, "w_down", act * up), "mlp_post_norm"), kv


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, attend: jax.Array, scalar: float) -> jax.Array:
    """Grouped-query attention: q (B,T,H,Dh), k/v (B,S,K,Dh), attend (B,T,S) bool; scores / sqrt(scalar).

    `jax.nn.dot_product_attention` picks cuDNN's fused kernel on GPUs where it applies and XLA's
    float32-score softmax elsewhere (the same numbers as transformers' eager attention).
    """
    return jax.nn.dot_product_attention(q, k, v, mask=attend[:, None], scale=1 / math.sqrt(scalar))


def _cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, attend: jax.Array, scalar: float) -> jax.Array:
    """`_attention` over keys and values in the cache's layout, k/v (B,K,S,Dh): the dots read the cache as it
    lies (batch dims B,K; S and Dh contiguous), where `jax.nn.dot_product_attention`'s (B,S,K,Dh) inputs made
    XLA on CPU transpose every layer's cache slice at every step. Same arithmetic as its XLA path: float32
    scores, scaled, masked with a large negative number, float32 softmax."""
    B, T, H, Dh = q.shape
    K, S = k.shape[1:3]
    G = H // K  # the query heads sharing a KV head are rows of one (G*T, Dh) matrix per (b, k)
    q = q.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
    # The cache is the dot's left operand: (S, Dh) times (Dh, G*T) streams through the cache at twice the speed
    # of (G*T, Dh) times (Dh, S) on XLA:CPU; the small result is transposed after scaling (a transpose right
    # after the dot is folded back into it).
    logits = jnp.einsum("bksd,bkqd->bksq", k, q, preferred_element_type=jnp.float32)
    logits = (logits * jnp.float32(1 / math.sqrt(scalar))).swapaxes(2, 3)
    attend = jnp.broadcast_to(attend[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    logits = jnp.where(attend, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def _write_slots(valid: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` (B, T) into `valid` (B, S) at slot `index`: shared (a slice update) or per row (a scatter)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(valid, new, (0, index))
    slots = index[:, None] + jnp.arange(new.shape[1])
    return valid.at[jnp.arange(new.shape[0])[:, None], slots].set(new, unique_indices=True, mode="drop")


def _write_layer(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """New keys or values `new` (B, T, K, Dh) into one layer's cache (B, K, S, Dh)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new.transpose(0, 2, 1, 3), (0, 0, index, 0))
    B, T = new.shape[:2]
    slots = index[:, None] + jnp.arange(T)  # (B, T); the indexed axes lead the update: (B, T, K, Dh)
    return cache.at[jnp.arange(B)[:, None], :, slots].set(new, unique_indices=True, mode="drop")


def _layer_of(stacked: jax.Array, i: int) -> jax.Array:
    """Layer i of a stacked weight as a buffer of its own, sharded as the stack is over its other axes."""
    sharding = getattr(stacked, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(stacked[i], jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
            *tuple(sharding.spec)[1:])))
    return stacked[i]


def unstack(decoder: "Decoder") -> "Decoder":
    """`decoder` with one buffer per layer (`LayerList`), sharing its other weights; as is if already so. Decoding
    calls it; a caller that decodes often unstacks once and drops the stacked decoder (they hold the weights
    twice until then)."""
    if isinstance(decoder.layers, LayerList):
        return decoder
    graph, state = nnx.split(decoder)
    out = nnx.merge(graph, state)
    out.layers = LayerList(decoder.layers)
    return out


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions for a left-padded batch: 0 at each row's first real token (HF's convention)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig, unstacked: bool = False) -> Decoder:
    """The model with `ShapeDtypeStruct` leaves: shapes and axes without allocating weights (as decoding
    holds them with `unstacked`)."""
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape((lambda: unstack(make())) if unstacked else make)


def logical_axes(model: Decoder) -> dict:
    """Each parameter's logical axes, as a nested dict shaped like `nnx.to_pure_dict(nnx.state(model))`."""
    is_var = lambda v: isinstance(v, nnx.Variable)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata()["axes"]), nnx.state(model, nnx.Param), is_leaf=is_var))
