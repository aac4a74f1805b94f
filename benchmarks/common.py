"""Helpers shared by the benchmarks: the machine and its load, memory bandwidth, and the rules as a
transformers LogitsProcessor (the baseline's equivalent of the adapter fused into our decoding step)."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import subprocess
import time

import numpy as np


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes moved per second (read + write) by a large host memory copy, best of 5."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def machine(jax, torch) -> str:
    """CPUs, load, library versions and `uptime`: the context every figure needs on a shared machine."""
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return (f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; jax {jax.__version__} "
            f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)\n"
            f"uptime: {uptime}")


def load_both(model, torch) -> tuple:
    """The tokenizer, our decoder (float32, unstacked as decoding holds it) and transformers' model from one
    `config.model()` section; the shipped SmolLM2 is converted on first use (`pretrained.locate`)."""
    from transformers import AutoModelForCausalLM

    from jax_implicit import convert, pretrained
    from jax_implicit import model as M

    path, tok = pretrained.locate(model)
    ours = M.unstack(convert.load_hf(path, param_dtype="float32", dtype="float32"))
    return tok, ours, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def host_tables(tables) -> dict:
    """`rules.RuleTables` as host values: arrays, and Python scalars for the 0-d fields."""
    out = {k: np.array(v) for k, v in vars(tables).items()}  # writable copies, for torch.from_numpy
    return {k: (v.item() if v.ndim == 0 else v) for k, v in out.items()}


def seen_ids(ids: np.ndarray, seen: np.ndarray, vocab: int) -> np.ndarray:
    """(batch, vocab) bool: the prompt ids the diversity rule counts (`seen` marks them in `ids`)."""
    out = np.zeros((len(ids), vocab), bool)
    for r in range(len(ids)):
        out[r, ids[r][seen[r]]] = True
    return out


def hf_rule_processor(tables: dict, width: int, seen: np.ndarray, torch):
    """The same product of experts as `rules.scores`, as a transformers LogitsProcessor (`tables` from
    `host_tables`, `width` the left-padded prompt width, `seen` from `seen_ids`)."""
    from transformers import LogitsProcessor

    offsets = torch.from_numpy(tables["offsets"])
    eos = torch.from_numpy(tables["eos"])
    scale, horizon, monotone, diversity = (tables[k] for k in ("eos_scale", "eos_horizon", "eos_monotone", "diversity"))

    class Rules(LogitsProcessor):
        def __init__(self):
            self.seen = torch.from_numpy(seen.copy())

        def __call__(self, input_ids, scores):
            n = input_ids.shape[1] - width
            if n > 0:
                self.seen[torch.arange(len(input_ids)), input_ids[:, -1]] = True
            ramp = (scale if monotone else 0.0) if n >= horizon else (scale * n / horizon if n > 0 else 0.0)
            rule = offsets + ramp * eos + diversity * self.seen.float()
            return torch.log_softmax(scores, -1) + torch.log_softmax(rule, -1)

    return Rules()


def thread_count(torch, setting: str | int) -> int:
    """The torch threads a config's thread setting ("default" or a number) stands for."""
    return torch.get_num_threads() if setting == "default" else int(setting)


def with_threads(torch, setting: str | int, fn):
    """`fn` run with `setting` torch threads (a config's "default" or a number). On a loaded 2-core machine
    OpenMP's second thread can make small ops several times slower, so the baselines try both."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(thread_count(torch, setting))
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def release_heap() -> None:
    """Hand the memory freed by the last step back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Untimed, before every timed step of either side: the two sides share one process and so one heap, and
    after a transformers training step our next step took 10-11 s instead of about 8 s until the heap was
    trimmed (measured on this project's 2-core machine; the cause inside glibc is not pinned down)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """XLA's float32 GFLOP/s on one (n, n) x (n, n) product, best of `repeats`: the compute ceiling that the
    prefill and training figures are set against."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(median_seconds(lambda: f(a).block_until_ready(), 1) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
