"""Prefill throughput: this model vs transformers on SmolLM2-135M, same prompts, one process.

    .venv/bin/python -m benchmarks.forward [--config.batch=8] [--config.seq=256]   # --help: the settings

Prints tokens/s for both and the ratio. Timings are medians over repeats after a warm-up (the JAX
warm-up includes compilation, which is reported separately). Also printed: each side's GFLOP/s against
XLA's float32 matmul peak on this machine, and so the largest ratio that peak allows: prefill is compute-bound,
and a side already near the peak leaves the other little to gain.
"""

from __future__ import annotations

import os
import time

import numpy as np
from ml_collections import ConfigDict

from benchmarks.common import matmul_peak_gflops, median_seconds
from jax_implicit import cli


def model_flops(cfg, batch: int, seq: int, n_params: int) -> float:
    """The least arithmetic a prefill of `batch` x `seq` tokens with logits at every position needs: 2 FLOPs per
    weight per token (the embedding counted once, as the output head), plus the attention's score and value
    products over the causal half of each (seq, seq) square."""
    pairs = batch * seq * (seq + 1) // 2
    return 2 * n_params * batch * seq + 2 * 2 * pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers


def run(args: ConfigDict) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from jax_implicit import convert, pretrained
    from jax_implicit import model as M

    path = pretrained.ensure_smollm2(args.checkpoints)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    tokens = ids.size

    decoder = convert.load_hf(path)
    forward = jax.jit(lambda d, t, m: d(t, M.positions_from_mask(m), m)[0])
    jt, jm = jnp.asarray(ids), jnp.asarray(mask)
    start = time.perf_counter()
    forward(decoder, jt, jm).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = median_seconds(lambda: forward(decoder, jt, jm).block_until_ready(), args.repeats)

    torch.set_num_threads(os.cpu_count() or 1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tt = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        hf(input_ids=tt)
        torch_s = median_seconds(lambda: hf(input_ids=tt), args.repeats)

    print(f"SmolLM2-135M float32 prefill, batch {args.batch} x {args.seq} tokens, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"  jax_implicit : {tokens / jax_s:10.0f} tokens/s  (first call incl. compile {compile_s:.1f} s)")
    print(f"  transformers : {tokens / torch_s:10.0f} tokens/s")
    print(f"  ratio        : {torch_s / jax_s:10.2f}x")
    flops = model_flops(decoder.cfg, args.batch, args.seq, sum(x.size for x in jax.tree.leaves(nnx.state(decoder))))
    peak = matmul_peak_gflops()
    print(f"  GFLOP/s      : jax_implicit {flops / jax_s / 1e9:.0f}, transformers {flops / torch_s / 1e9:.0f}; XLA's "
          f"float32 matmul peak {peak:.0f}, so the ratio can reach at most {peak * 1e9 * torch_s / flops:.2f}x")


if __name__ == "__main__":
    cli.main(run, "configs/bench/forward.py")
