"""One optimizer step of jax_implicit.train vs a transformers PyTorch AdamW step, in one process.

SmolLM2-135M in float32, batch 4 x 256 tokens (every token trained on), same weights on both sides.
Reports tokens/s, the ratio, and achieved GFLOP/s (6 x parameters x tokens / time) against a measured
float32 matmul peak. Run from the repository root:

    .venv/bin/python benchmarks/train.py [--steps 3] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_implicit import convert, train
from jax_implicit import model as M


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_step_seconds(path, tokens: np.ndarray, steps: int) -> list[float]:
    decoder = convert.load_hf(path)
    graphdef, params = nnx.split(decoder)
    params = nnx.to_pure_dict(params)
    optimizer = optax.adam(1e-5)
    state = train.init_state(params, optimizer, 0)
    micro_step, apply_step = train.build_steps(graphdef, optimizer)
    mask = np.ones_like(tokens, bool)
    batch = dict(tokens=tokens, mask=mask, loss=mask)
    weights = train.loss_weights([batch], "token")[0]
    inputs = dict(tokens=tokens, mask=mask, weights=weights)
    accum = train.zeros_accum(state["params"])

    def step():
        nonlocal state, accum
        accum, loss = micro_step(state["params"], accum, inputs)
        float(loss)  # the loop reads the loss every step
        state, accum = apply_step(state, accum)
        jax.block_until_ready(state)

    step()  # compile
    return [_timed(step) for _ in range(steps)]


def torch_step_seconds(path, tokens: np.ndarray, steps: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(tokens, dtype=torch.long)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)

    step()
    return [_timed(step) for _ in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    path = convert.ensure_smollm2("checkpoints")
    cfg = M.from_hf_config(path)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(M.abstract(cfg))))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = tokens.size

    peak = matmul_peak_gflops()
    jax_s = statistics.median(jax_step_seconds(path, tokens, args.steps))
    torch_s = statistics.median(torch_step_seconds(path, tokens, args.steps))
    print(f"load average before/after: {os.getloadavg()}")
    print(f"SmolLM2-135M float32 ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"median of {args.steps} optimizer steps; float32 matmul peak {peak:.1f} GFLOP/s")
    for name, s in (("jax_implicit", jax_s), ("transformers", torch_s)):
        gflops = 6 * n_params * n_tokens / s / 1e9
        print(f"  {name:13s} {s:7.2f} s/step  {n_tokens / s:7.1f} tokens/s  {gflops:6.1f} GFLOP/s "
              f"({100 * gflops / peak:.0f}% of peak)")
    print(f"  ratio jax/transformers: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
