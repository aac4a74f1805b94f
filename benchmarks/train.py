"""One optimizer step of jax_implicit.train vs a transformers PyTorch AdamW step, in one process.

SmolLM2-135M in float32, batch 4 x 256 tokens (every token trained on), same weights on both sides.
Reports tokens/s, the ratio, and achieved GFLOP/s (6 x parameters x tokens / time) against a measured
float32 matmul peak. With `--config.variants=full,lora,qlora` it also times LoRA (RT's rank 64, alpha 16, all
seven projections) and QLoRA (NF4 base) steps against transformers + peft (QLoRA there with bitsandbytes'
4-bit layers), and prints each variant's ratio to full finetuning and the bytes its weights and Adam
state take. Run from the repository root:

    .venv/bin/python -m benchmarks.train [--config.steps=3] [--config.variants=full,lora,qlora]   # --help: the settings
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from ml_collections import ConfigDict

from benchmarks import common
from jax_implicit import cli


def _cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is far less sensitive to other jobs' load."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


RT_LORA = dict(rank=64, alpha=16.0, dropout=0.0)


def _bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def jax_step(path, tokens: np.ndarray, variant: str = "full"):
    """A compiled optimizer step of the training loop (one micro-batch = the whole batch), and the bytes of
    its weights and optimizer state."""
    import jax
    import optax
    from flax import nnx

    from jax_implicit import convert, lora, train_step

    decoder = convert.load_hf(path)
    graphdef, params = nnx.split(decoder)
    params, frozen = nnx.to_pure_dict(params), {}
    if variant != "full":
        lcfg = lora.lora_config(**RT_LORA, quant="nf4" if variant == "qlora" else "none")
        graphdef, params, frozen = lora.split(lora.apply(decoder, lcfg))
    optimizer = optax.adam(1e-5)
    state = train_step.init_state(params, optimizer, 0)
    micro_step, apply_step = train_step.build_steps(graphdef, optimizer)
    mask = np.ones_like(tokens, bool)
    batch = dict(tokens=tokens, mask=mask, loss=mask)
    weights = train_step.loss_weights([batch], "token")[0]
    inputs = dict(tokens=tokens, mask=mask, weights=weights)
    accum = train_step.zeros_accum(state["params"])

    def step():
        nonlocal state, accum
        accum, loss = micro_step(state["params"], accum, inputs, frozen)
        float(loss)  # the loop reads the loss every step
        state, accum, *_ = apply_step(state, accum)
        jax.block_until_ready(state)

    step()  # compile
    return step, _bytes(state) + _bytes(frozen)


def torch_step(path, tokens: np.ndarray, variant: str = "full"):
    import torch
    from transformers import AutoModelForCausalLM

    from jax_implicit import lora

    kw = {}
    if variant == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if variant != "full":
        from peft import LoraConfig, get_peft_model

        targets = list(lora.TARGETS)
        model = get_peft_model(model, LoraConfig(r=RT_LORA["rank"], lora_alpha=RT_LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(tokens, dtype=torch.long)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    step()
    tensors = [*model.parameters(), *model.buffers()]
    moments = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return step, sum(t.numel() * t.element_size() for t in tensors + moments)


def run(args: ConfigDict) -> None:
    import jax
    from flax import nnx

    from jax_implicit import model as M
    from jax_implicit import pretrained

    variants = list(args.variants)
    if bad := set(variants) - {"full", "lora", "qlora"}:
        raise ValueError(f"--config.variants: unknown {sorted(bad)}; expected any of full, lora, qlora")
    path = pretrained.ensure_smollm2("checkpoints")
    cfg = M.from_hf_config(path)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(M.abstract(cfg))))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = tokens.size

    load_before = os.getloadavg()
    peak = common.matmul_peak_gflops()
    steps, memory = {}, {}
    for v in variants:
        for side, build in (("jax_implicit", jax_step), ("transformers", torch_step)):
            name = side if v == "full" else f"{side} {v}"
            steps[name], memory[name] = build(path, tokens, v)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so that load from other processes hits both alike
        for name, step in steps.items():
            common.release_heap()
            wall, cpu_s = _cpu_timed(step)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    jax_s, torch_s = (statistics.median(times[name]) for name in list(steps)[:2])
    jax_best, torch_best = (min(times[name]) for name in list(steps)[:2])
    jax_cpu, torch_cpu = (statistics.median(cpu[name]) for name in list(steps)[:2])
    print(f"load average (1/5/15 min) before: {load_before}, after: {os.getloadavg()}; {os.cpu_count()} CPUs")
    print("per-step wall seconds:", {name: [round(t, 2) for t in ts] for name, ts in times.items()})
    print("per-step CPU seconds:", {name: [round(t, 2) for t in ts] for name, ts in cpu.items()})
    print(f"SmolLM2-135M float32 ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"median of {args.steps} optimizer steps; float32 matmul peak {peak:.1f} GFLOP/s")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, s in medians.items():
        gflops = 6 * n_params * n_tokens / s / 1e9
        print(f"  {name:26s} {s:7.2f} s/step  {n_tokens / s:7.1f} tokens/s  {gflops:6.1f} GFLOP/s "
              f"({100 * gflops / peak:.0f}% of peak)  weights + Adam state {memory[name] / 2**20:7.1f} MiB")
    if variants[0] == "full":
        print(f"  ratio jax/transformers: {torch_s / jax_s:.2f}x (medians), {torch_best / jax_best:.2f}x (fastest "
              f"steps: {n_tokens / jax_best:.1f} vs {n_tokens / torch_best:.1f} tokens/s), {torch_cpu / jax_cpu:.2f}x "
              f"in CPU seconds per step ({jax_cpu:.1f} vs {torch_cpu:.1f})")
    for v in (v for v in variants if v != "full"):
        ours, theirs = medians[f"jax_implicit {v}"], medians[f"transformers {v}"]
        line = f"  {v}: jax/transformers+peft {theirs / ours:.2f}x"
        if "full" in variants:
            line += f"; step time vs full finetuning: jax {ours / jax_s:.2f}x, transformers {theirs / torch_s:.2f}x"
        print(line)


if __name__ == "__main__":
    cli.main(run, "configs/bench/train.py")
