"""Scoring throughput: ranking's sequences packed by length vs one full forward pass, SmolLM2-135M.

    .venv/bin/python -m benchmarks.scoring [--config.n=40] [--config.k=5] [--config.batch_tokens=4096]

Scores the ranking sequences of the first `n` dolly examples (each with its own and `k` random responses)
and prints real tokens per second, the padding, the number of shapes, and the tokens per second of the
plain forward pass (logits of every position) on one unpadded batch of `batch_tokens` tokens. Timings are
medians over repeats after a warm-up that compiles every shape (its time is reported separately).
"""

from __future__ import annotations

import os
import time

import numpy as np
from ml_collections import ConfigDict

from benchmarks.common import median_seconds
from jax_implicit import cli


def run(args: ConfigDict) -> None:
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jax_implicit import convert, pretrained
    from jax_implicit import model as M
    from jax_implicit.evaluate import ranking, scoring

    path = pretrained.ensure_smollm2(args.checkpoints)
    tok, decoder = AutoTokenizer.from_pretrained(path), convert.load_hf(path)
    rows = ranking.load_examples("data/dolly/dolly_train.json", args.n)
    others = ranking.pairings(len(rows), args.k, seed=0)
    encoded = [ranking.encode(tok, ranking.user_text(rows[i]), rows[j]["output"], "user_assistant")
               for i in range(len(rows)) for j in [i, *others[i]]]
    seqs, starts = [ids[:args.max_len] for ids, _ in encoded], [s for _, s in encoded]
    real = sum(map(len, seqs))
    batches = scoring.batches(decoder, seqs, args.batch_tokens)
    padded = sum(b.rows * b.width for b in batches)
    score = lambda: scoring.continuation_logprobs(decoder, seqs, starts, batch_tokens=args.batch_tokens)  # noqa: E731
    start = time.perf_counter()
    score()
    warm = time.perf_counter() - start
    scoring_s = median_seconds(score, args.repeats)

    width = 256
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 49152, (args.batch_tokens // width, width)), jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    forward = jax.jit(lambda d, t, m: d(t, M.positions_from_mask(m), m)[0])
    forward(decoder, ids, mask).block_until_ready()
    forward_s = median_seconds(lambda: forward(decoder, ids, mask).block_until_ready(), args.repeats)

    print(f"SmolLM2-135M float32, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}, jax {jax.__version__}")
    print(f"  scoring : {real / scoring_s:8.0f} real tokens/s  ({len(seqs)} sequences, {real} tokens, padding "
          f"{padded / real - 1:.1%}, {len(batches)} batches, {len({(b.rows, b.width) for b in batches})} shapes; "
          f"first run incl. compiles {warm:.0f} s)")
    print(f"  forward : {ids.size / forward_s:8.0f} tokens/s  (one unpadded {ids.shape[0]} x {width} batch, logits)")


if __name__ == "__main__":
    cli.main(run, "configs/bench/scoring.py")
