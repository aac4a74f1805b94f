"""Memory controls shared by training and inference: rematerialisation of the layer scan, a chunked
token log-likelihood (training's cross-entropy and scoring's log-probabilities), and the mixed-precision
rule for training.

They are keys of the `config.model()` section (`remat`, `loss_chunk`, `bf16_master_weights`), so
training, the planner and the compile check read the same values.

- `remat` names a `jax.checkpoint` policy for the body of the layer scan (as MaxText's `remat_policy`
  and Levanter's `gradient_checkpointing`): "none" keeps every residual of every layer for the
  backward pass; "full" keeps only each layer's input and recomputes the rest; "dots" keeps the
  outputs of the weight matmuls (dot products without batch dimensions, so not the attention
  scores) and recomputes norms, activations and attention.
- `loss_chunk` > 0 computes the loss (and scores) `loss_chunk` tokens at a time, recomputing each chunk's float32
  logits in the backward pass, so the full (batch, seq, vocab) float32 logits never exist at once
  (Gemma 3's 262k vocabulary makes them the largest tensor of a step). 0: all tokens at once.
- Training keeps float32 master weights and Adam moments and computes in `model.dtype`
  (MaxText's and Levanter's mixed precision). bfloat16 masters lose the updates: at lr 1e-5 Adam's
  step is ~1e-5 while a bfloat16 weight of magnitude 0.01 has a spacing of ~4e-5, so most updates
  round away. They are refused unless `bf16_master_weights` is set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_implicit import pinning

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """`fn` (a scan body) rematerialised under the named policy; unchanged for "none"."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r}; expected one of {tuple(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def options(model_section: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields a `config.model()` section sets beyond the dtypes (`cfg.replace(**options(...))`)."""
    return dict(remat=model_section["remat"], loss_chunk=int(model_section["loss_chunk"]))


def precision_error(model_section: Mapping[str, Any]) -> str | None:
    """Why a `config.model()` section cannot be trained as given (bfloat16 masters without opt-in), or None."""
    if model_section["param_dtype"] == "bfloat16" and not model_section["bf16_master_weights"]:
        return ("model.param_dtype='bfloat16' trains bfloat16 master weights and Adam moments: at the paper's "
                "learning rates most updates are smaller than bfloat16's spacing and round away. Use "
                "param_dtype='float32' with dtype='bfloat16' (float32 masters, bfloat16 compute), or set "
                "model.bf16_master_weights=True to accept the loss")
    return None


def _logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(hidden @ head.T)[targets] in float32; hidden (B, T, D), head (V, D), targets (B, T)."""
    logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logits = pinning.constrain(logits, ("batch", "seq", "vocab"))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 0) -> jax.Array:
    """(B, T) float32 log-probabilities of `targets` under the logits hidden @ head.T, `chunk` tokens at a time.

    The one token log-likelihood of training's loss and of scoring. hidden (B, T, D) are the final-norm
    outputs, head the (V, D) output embedding, targets (B, T). chunk 0 or >= T: in one piece. Otherwise
    the tokens are padded to a multiple of `chunk` and scanned; each chunk's logits are recomputed in the
    backward pass, so at most (B, chunk, V) float32 logits are alive at once (Gemma 3's 262k vocabulary
    makes the whole (B, T, V) the largest tensor of a step). Same values and gradients up to float32 order.
    """
    b, t, _ = hidden.shape
    if chunk <= 0 or chunk >= t:
        return _logprobs(hidden, head, targets)
    n = -(-t // chunk)
    hidden, targets = (jnp.pad(a, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (a.ndim - 2)) for a in (hidden, targets))
    split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # (n, B, chunk, ...)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(_, xs):
        h, tg = xs
        return None, _logprobs(h, head, tg)

    _, out = jax.lax.scan(body, None, (split(hidden), split(targets)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :t]


def cross_entropy_sum(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                      chunk: int = 0) -> jax.Array:
    """sum over tokens of weights * cross-entropy(hidden @ head.T, targets): `token_logprobs`, weighted."""
    return -jnp.sum(token_logprobs(hidden, head, targets, chunk) * weights)
