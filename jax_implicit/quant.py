"""Weight-only quantisation for QLoRA: bitsandbytes' NF4 with double quantisation, and blockwise int8.

NF4 is bitsandbytes' layout, so a weight quantised here holds the same codes and scales that
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`
gives for the transformers weight (out_features, in_features): the row-major weight in blocks of 64,
each scaled by its absolute maximum and rounded to the nearest of the 16 NF4 levels (two codes per
byte, the first in the high nibble). Double quantisation stores those float32 scales as 8-bit codes of
bitsandbytes' signed dynamic map, in blocks of 256 after subtracting their mean, plus one float32
scale per 256 blocks. Dequantisation computes in float32 (as bitsandbytes does) and returns the
compute dtype, so the model runs on the fly in bfloat16 with 4.13 bits a weight stored.

int8 is a simpler second option (not bitsandbytes' LLM.int8): symmetric absmax int8 per block of 64
with one float32 scale per block (8.5 bits a weight).

Every function works per matrix (out, in) with jnp, so it traces under `jax.eval_shape`, `jit` and
`vmap` over a stacked layers axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
BLOCK = 64  # weights per scale
SCALE_BLOCK = 256  # NF4 scales per second-level scale
# The 16 NF4 levels (quantiles of a standard normal, rescaled to [-1, 1]), as bitsandbytes lists them.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (its `create_dynamic_map()`): for exponents 10^-6 .. 10^0,
    2^i evenly spaced fractions in [0.1, 1] at decade i, both signs, plus 0 and 1, sorted."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = _torch_linspace(0.1, 1.0, 2 ** i + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += [*scaled.tolist(), *(-scaled).tolist()]
    return np.sort(np.array(values, np.float32))


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace as torch's CPU kernel computes it: a float32 step, each value one fused multiply-add
    from the start (first half) or the end (second half), so the code book matches bitsandbytes' bit for bit."""
    f32 = lambda v: np.float64(np.float32(v))
    step = f32(np.float32(np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    return np.where(i < steps // 2, f32(start) + step * i, f32(end) - step * (steps - 1 - i)).astype(np.float32)


def _blockwise(x: jax.Array, code: np.ndarray, block: int) -> tuple[jax.Array, jax.Array]:
    """Indices into `code` (uint8) and per-block absmax (float32) of flat `x`; a short last block is
    zero-padded, which leaves its absmax unchanged. Rounds to the nearest level (ties go down), as
    bitsandbytes' `bucketize` over the midpoints does."""
    n = x.shape[0]
    padded = jnp.pad(x.astype(jnp.float32), (0, -n % block)).reshape(-1, block)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    scaled = jnp.clip(padded * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    bounds = jnp.asarray((code[:-1] + code[1:]) / 2)
    return jnp.searchsorted(bounds, scaled.reshape(-1)[:n], side="left").astype(jnp.uint8), absmax


def quantize(w: jax.Array, kind: str) -> dict[str, jax.Array]:
    """The stored form of one matrix `w` (out, in); `in` must be a multiple of 64 (every real model's is)."""
    out, inp = w.shape
    if inp % BLOCK:
        raise ValueError(f"quantisation needs in_features divisible by {BLOCK}, got a {w.shape} weight")
    if kind == "int8":
        blocks = w.astype(jnp.float32).reshape(out, inp // BLOCK, BLOCK)
        scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
        q = jnp.round(blocks / jnp.maximum(scale, 1e-38)[..., None]).astype(jnp.int8)
        return {"int8": q.reshape(out, inp), "scale": scale}
    if kind != "nf4":
        raise ValueError(f"unknown quantisation {kind!r}; expected one of {KINDS}")
    idx, absmax = _blockwise(w.reshape(-1), NF4_CODE, BLOCK)
    packed = (idx[0::2] << 4) | idx[1::2]
    offset = jnp.mean(absmax)
    qabs, absmax2 = _blockwise(absmax - offset, dynamic_code(), SCALE_BLOCK)
    return {"nf4": packed.reshape(out, inp // 2), "absmax": qabs.reshape(out, inp // BLOCK),
            "absmax2": absmax2, "offset": offset}


def nf4_absmax(q: dict[str, jax.Array]) -> jax.Array:
    """The float32 block scales back from their double quantisation (flat, one per block of 64)."""
    qabs = q["absmax"].reshape(-1)
    n = qabs.shape[0]
    scale = jnp.repeat(q["absmax2"], SCALE_BLOCK)[:n]
    return jnp.asarray(dynamic_code())[qabs] * scale + q["offset"]


def dequantize(q: dict[str, jax.Array], dtype=jnp.bfloat16) -> jax.Array:
    """The matrix (out, in) back from `quantize`, computed in float32 and returned in `dtype`."""
    if "int8" in q:
        out, inp = q["int8"].shape
        blocks = q["int8"].astype(jnp.float32).reshape(out, inp // BLOCK, BLOCK)
        return (blocks * q["scale"][..., None]).reshape(out, inp).astype(dtype)
    packed = q["nf4"]
    out, half = packed.shape
    idx = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)
    values = jnp.asarray(NF4_CODE)[idx].reshape(-1, BLOCK) * nf4_absmax(q)[:, None]
    return values.reshape(out, 2 * half).astype(dtype)


def stored_bits(kind: str) -> float:
    """Bits a weight takes in memory (codes plus scales), for the planner."""
    return {"nf4": 4 + 8 / BLOCK + 32 / (BLOCK * SCALE_BLOCK), "int8": 8 + 32 / BLOCK}[kind]
