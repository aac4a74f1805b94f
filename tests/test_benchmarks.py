"""The decoding benchmarks run end to end (on a tiny model, a few tokens): a broken benchmark is found here,
not on the quiet machine its figures are taken on. Their figures are not checked (never timed in tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, model: Path, *settings: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", f"--config.model.path={model}", *settings],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_decode_benchmark_runs_and_both_sides_agree(tiny_smol_dir):
    out = bench("decode", tiny_smol_dir, "--config.batch_sizes=2", "--config.new_tokens=4", "--config.reps=1",
                "--config.hf_threads=1")
    line = next(x for x in out.splitlines() if x.startswith("batch   2:"))
    assert re.search(r"ratio \d+\.\d\dx", line) and "rows equal up to our first EOS 100%" in line


def test_generate_benchmark_runs_and_both_sides_agree(tiny_smol_dir):
    out = bench("generate", tiny_smol_dir, "--config.limit=2", "--config.new_tokens=6", "--config.batch_size=2",
                "--config.hf_batch_sizes=2", "--config.hf_threads=1")
    assert "workload: 4 instructions" in out and "identical responses 4/4" in out, out
