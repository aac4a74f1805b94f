"""The decoder's seven linear projections: one einsum over a base weight that is stored plain or quantised
(`quant.py`), plus an optional LoRA delta (`lora.py` adds the adapter weights).

A layer's weights arrive as a dict (one layer's slice of the stacked parameters, inside `lax.scan`):
`wq` (plain) or `wq_q_*` (the quantised parts of the transformers-layout matrix (out, in)), and
`wq_lora_a` (*in, r) / `wq_lora_b` (r, *out) when the projection has an adapter. `lora_key`, when present,
is this layer's dropout key (training only); without it LoRA dropout is off, as in peft's eval mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax_implicit import quant

SPECS = {  # x, weight -> y, in our (*in, *out) weight layout
    "wq": "btd,dhk->bthk", "wk": "btd,dhk->bthk", "wv": "btd,dhk->bthk", "wo": "bthk,hkd->btd",
    "w_gate": "btd,df->btf", "w_up": "btd,df->btf", "w_down": "btf,fd->btd",
}
QUANT_PREFIX = "_q_"


def io_shapes(cfg, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (input, output) dims of projection `name` for a `model.ModelConfig`."""
    D, F, H, K, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"wq": ((D,), (H, Dh)), "wk": ((D,), (K, Dh)), "wv": ((D,), (K, Dh)), "wo": ((H, Dh), (D,)),
            "w_gate": ((D,), (F,)), "w_up": ((D,), (F,)), "w_down": ((F,), (D,))}[name]


def to_matrix(w: jax.Array, n_in: int) -> jax.Array:
    """Our (*in, *out) weight as transformers' (out, in) matrix."""
    n_out = w.ndim - n_in
    w = jnp.moveaxis(w, tuple(range(n_in)), tuple(range(n_out, w.ndim)))
    return w.reshape(math.prod(w.shape[:n_out]), -1)


def from_matrix(m: jax.Array, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> jax.Array:
    """transformers' (out, in) matrix as our (*in, *out) weight."""
    w = m.reshape(*out_shape, *in_shape)
    return jnp.moveaxis(w, tuple(range(len(out_shape), w.ndim)), tuple(range(len(in_shape))))


def base_weight(cfg, w: dict, name: str, dtype) -> jax.Array:
    """Projection `name`'s base weight in `dtype`, dequantised if it is stored quantised."""
    if name in w:
        return w[name].astype(dtype)
    prefix = name + QUANT_PREFIX
    parts = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    return from_matrix(quant.dequantize(parts, dtype), *io_shapes(cfg, name))


def _operands(spec: str) -> list[str]:
    """An einsum spec's x, weight and output subscripts."""
    return spec.replace("->", ",").split(",")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def contract(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)`, whose backward pass materialises the output's cotangent before the two
    contractions that read it.

    Under plain autodiff XLA:CPU fuses the elementwise producer of that cotangent (e.g. SiLU's gradient)
    with the transpose that the weight-gradient dot wants, and writes it element by element in transposed
    order, reading every input with a large stride: 40 ms a layer for SmolLM2's MLP, then the same
    elementwise work again for the input gradient. Behind an optimisation barrier the cotangent is written
    once in its own layout and the transpose is a plain copy (`benchmarks.train`: about 15% of a step)."""
    return jnp.einsum(spec, x, w)


def _contract_fwd(spec: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.einsum(spec, x, w), (x, w)


def _contract_bwd(spec: str, saved: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = saved
    xs, ws, ys = _operands(spec)
    dy = jax.lax.optimization_barrier(dy)
    return jnp.einsum(f"{ys},{ws}->{xs}", dy, w), jnp.einsum(f"{xs},{ys}->{ws}", x, dy)


contract.defvjp(_contract_fwd, _contract_bwd)


def project(cfg, w: dict, name: str, x: jax.Array) -> jax.Array:
    """x times projection `name`'s weight, plus scale * dropout(x) A B when it has a LoRA adapter."""
    spec = SPECS[name]
    y = contract(spec, x, base_weight(cfg, w, name, x.dtype))
    if name + "_lora_a" not in w:
        return y
    xs, ws, ys = _operands(spec)
    ins, outs = "".join(c for c in ws if c not in ys), "".join(c for c in ws if c in ys)
    if "lora_key" in w and cfg.lora_dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(w["lora_key"], list(SPECS).index(name)),
                                    1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    down = jnp.einsum(f"{xs},{ins}r->btr", x, w[name + "_lora_a"].astype(x.dtype))
    up = jnp.einsum(f"btr,r{outs}->{ys}", down, w[name + "_lora_b"].astype(x.dtype))
    return y + (up * cfg.lora_scale).astype(y.dtype)
