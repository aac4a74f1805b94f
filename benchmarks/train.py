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


def _cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is far less sensitive to other jobs' load."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def jax_step(path, tokens: np.ndarray):
    """A compiled optimizer step of the training loop (one micro-batch = the whole batch)."""
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
        state, accum, _ = apply_step(state, accum)
        jax.block_until_ready(state)

    step()  # compile
    return step


def torch_step(path, tokens: np.ndarray):
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
        loss.item()

    step()
    return step


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

    load_before = os.getloadavg()
    peak = matmul_peak_gflops()
    steps = {"jax_implicit": jax_step(path, tokens), "transformers": torch_step(path, tokens)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so that load from other processes hits both alike
        for name, step in steps.items():
            wall, cpu_s = _cpu_timed(step)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    jax_s, torch_s = (statistics.median(times[name]) for name in steps)
    jax_best, torch_best = (min(times[name]) for name in steps)
    jax_cpu, torch_cpu = (statistics.median(cpu[name]) for name in steps)
    print(f"load average (1/5/15 min) before: {load_before}, after: {os.getloadavg()}; {os.cpu_count()} CPUs")
    print("per-step wall seconds:", {name: [round(t, 2) for t in ts] for name, ts in times.items()})
    print("per-step CPU seconds:", {name: [round(t, 2) for t in ts] for name, ts in cpu.items()})
    print(f"SmolLM2-135M float32 ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"median of {args.steps} optimizer steps; float32 matmul peak {peak:.1f} GFLOP/s")
    for name, s in (("jax_implicit", jax_s), ("transformers", torch_s)):
        gflops = 6 * n_params * n_tokens / s / 1e9
        print(f"  {name:13s} {s:7.2f} s/step  {n_tokens / s:7.1f} tokens/s  {gflops:6.1f} GFLOP/s "
              f"({100 * gflops / peak:.0f}% of peak)")
    print(f"  ratio jax/transformers: {torch_s / jax_s:.2f}x (medians), {torch_best / jax_best:.2f}x (fastest steps: "
          f"{n_tokens / jax_best:.1f} vs {n_tokens / torch_best:.1f} tokens/s), {torch_cpu / jax_cpu:.2f}x in CPU "
          f"seconds per step ({jax_cpu:.1f} vs {torch_cpu:.1f})")


if __name__ == "__main__":
    main()
