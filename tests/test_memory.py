"""Memory controls (memory.py): remat policies, chunked token log-likelihood and cross-entropy, fused attention,
mixed precision."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_implicit import memory, train_config, train_step
from jax_implicit import model as M

# GQA (4 query heads on 2 KV heads), Gemma-style sliding window on the first layer, tied head.
GEMMA_LIKE = M.ModelConfig("gemma3_text", 97, 32, 64, 2, 4, 2, 8, norm="gemma_rms", activation="gelu_tanh",
                           qk_norm=True, post_norms=True, scale_embeddings=True, query_pre_attn_scalar=8,
                           layer_types=("sliding_attention", "full_attention"), sliding_window=3,
                           rope_local_theta=10000.0, rope_theta=1e6, tie_word_embeddings=True)
LLAMA = M.ModelConfig("llama", 97, 32, 64, 2, 4, 2, 8)


def batch(b=2, t=12, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), bool)
    mask[0, :4] = False  # left padding
    weights = rng.uniform(0.1, 1.0, (b, t)).astype(np.float32) * mask
    weights[:, 0] = 0.0
    return dict(tokens=jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32), mask=jnp.asarray(mask),
                weights=jnp.asarray(weights))


def loss_and_grads(cfg, data, seed=0):
    graphdef, params = nnx.split(M.init(cfg, seed))
    params = nnx.to_pure_dict(params)
    return jax.jit(jax.value_and_grad(train_step.loss_sum), static_argnums=1)(params, graphdef, data)


def residual_bytes(cfg, data):
    """Bytes `jax.vjp` keeps for the backward pass of the training loss."""
    graphdef, params = nnx.split(M.abstract(cfg))
    vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: train_step.loss_sum(q, graphdef, data), p)[1], nnx.to_pure_dict(params))
    return sum(math.prod(r.shape) * r.dtype.itemsize for r in jax.tree.leaves(vjp))


def close(a, b, rtol=1e-4, atol=5e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients_and_keep_less(policy):
    data = batch()
    close(loss_and_grads(LLAMA.replace(remat=policy), data), loss_and_grads(LLAMA, data))
    assert residual_bytes(LLAMA.replace(remat=policy), data) < 0.8 * residual_bytes(LLAMA, data)


def test_chunked_cross_entropy_equals_the_full_one():
    data = batch(t=13)  # 13 tokens in chunks of 4: the last chunk is padded
    close(loss_and_grads(GEMMA_LIKE.replace(loss_chunk=4), data), loss_and_grads(GEMMA_LIKE, data))
    # no (B, T, V) float32 tensor is kept for the backward pass: only (B, chunk, V)-sized work
    graphdef, params = nnx.split(M.abstract(GEMMA_LIKE.replace(loss_chunk=4)))
    vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: train_step.loss_sum(q, graphdef, data), p)[1], nnx.to_pure_dict(params))
    assert not [r.shape for r in jax.tree.leaves(vjp) if r.shape[-1:] == (97,) and math.prod(r.shape) >= 2 * 13 * 97]
    assert residual_bytes(GEMMA_LIKE.replace(loss_chunk=4), data) < residual_bytes(GEMMA_LIKE, data)


def test_chunked_token_logprobs_are_log_softmax():
    rng = np.random.default_rng(0)
    hidden, head = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 13, 32), (97, 32)))
    targets = jnp.asarray(rng.integers(0, 97, (2, 13)), jnp.int32)
    want = jnp.take_along_axis(jax.nn.log_softmax(hidden @ head.T), targets[..., None], axis=-1)[..., 0]
    for chunk in (0, 4):
        close(memory.token_logprobs(hidden, head, targets, chunk), want, rtol=1e-5, atol=1e-5)


def einsum_attention(q, k, v, attend, scalar):
    """The explicit grouped-query attention this project used before `jax.nn.dot_product_attention`."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(scalar)
    scores = jnp.where(attend[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


def test_fused_attention_equals_the_einsum_one(monkeypatch):
    """Padding, GQA and a sliding window, with and without a KV cache (prefill then one decode step)."""
    decoder = M.init(GEMMA_LIKE, seed=3)
    data = batch(t=10)
    tokens, mask = data["tokens"], data["mask"]
    pos = M.positions_from_mask(mask)

    def run():
        logits, _ = decoder(tokens, pos, mask)
        cache = M.KVCache.init(GEMMA_LIKE, 2, 12)
        prefill, cache = decoder(tokens, pos, mask, cache)
        step, _ = decoder(tokens[:, :1], pos[:, -1:] + 1, jnp.ones((2, 1), bool), cache)
        return [np.asarray(x) for x in (logits, prefill, step)]

    new = run()
    monkeypatch.setattr(M, "_attention", einsum_attention)
    monkeypatch.setattr(M, "_cached_attention",  # the cache holds keys and values as (B, K, S, Dh)
                        lambda q, k, v, *a: einsum_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), *a))
    old = run()
    real = np.asarray(mask)
    for a, b in zip(new[:2], old[:2]):
        np.testing.assert_allclose(a[real], b[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new[2], old[2], rtol=1e-5, atol=1e-5)


def train_deltas(param_dtype, dtype, steps=4, lr=1e-5):
    """How far `steps` Adam steps at `lr` move the weights (float32 differences), from the same start."""
    cfg = LLAMA.replace(param_dtype=param_dtype, dtype=dtype)
    start = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(M.init(LLAMA, seed=1))))
    graphdef, _ = nnx.split(M.abstract(cfg))
    params = jax.tree.map(lambda p: jnp.asarray(p, M.DTYPES[param_dtype]), start)
    optimizer = optax.adam(lr)
    micro, apply = train_step.build_steps(graphdef, optimizer)
    state = train_step.init_state(params, optimizer, 0)
    for i in range(steps):
        accum, _ = micro(state["params"], jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                         batch(seed=i))
        state, *_ = apply(state, accum)
    return jax.tree.map(lambda a, b: np.asarray(a, np.float32) - b, state["params"], start)


def test_float32_masters_with_bfloat16_compute_track_float32_training_where_bfloat16_masters_do_not():
    ref = train_deltas("float32", "float32")
    mixed = train_deltas("float32", "bfloat16")
    bf16 = train_deltas("bfloat16", "bfloat16")
    err = lambda d: (np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(ref))))
                     / np.sqrt(sum(np.sum(b ** 2) for b in jax.tree.leaves(ref))))
    print(f"relative distance to float32 training: fp32 masters {err(mixed):.3f}, bf16 masters {err(bf16):.3f}")
    assert err(mixed) < 0.15  # the same updates, up to bfloat16 rounding of the gradients
    assert err(bf16) > 0.5  # most updates rounded away (or replaced by rounding noise)


def test_bfloat16_master_weights_need_the_opt_in():
    cfg = train_config.default_config()
    cfg.model.update(param_dtype="bfloat16", dtype="bfloat16")
    with pytest.raises(train_config.ConfigError, match="model.param_dtype='bfloat16'.*model.bf16_master_weights=True"):
        train_config.check_config(cfg)
    cfg.model.bf16_master_weights = True
    train_config.check_config(cfg)
    cfg.model.update(param_dtype="float32", remat="some")
    with pytest.raises(train_config.ConfigError, match="model.remat='some'; expected one of"):
        train_config.check_config(cfg)
