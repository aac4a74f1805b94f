"""The end-to-end evaluation workload: the 56 validation instructions and the first 200 AlpacaEval
instructions, the three rules, up to `new_tokens` tokens stopping at EOS; our continuous-batching decoder
(`serving.serve`) against transformers `generate` with the equivalent rule LogitsProcessor, in one process.

    .venv/bin/python -m benchmarks.generate [--config.limit=8] [--config.new_tokens=512]   # --help: the settings

Reported: useful tokens (before EOS) per second and wall time for each side (ours with and without its
compilations; a rerun loads our compiled programs from JAX's persistent cache, `cli.persistent_cache`),
transformers at the fastest of its batch sizes and torch thread settings (every pair is tried), the ratio,
and how many responses agree token for token.
"""

from __future__ import annotations

import itertools
import os
import time

from ml_collections import ConfigDict

from benchmarks.common import hf_rule_processor, host_tables, load_both, machine, seen_ids, thread_count, with_threads
from jax_implicit import cli

WORKLOAD = (("val", 56), ("alpaca_eval", 200))


def useful(row, eos) -> list[int]:
    """The response ids before the first EOS."""
    row = list(row)
    return row[:min((row.index(e) for e in eos if e in row), default=len(row))]


def run(cfg: ConfigDict) -> None:
    import jax
    import torch
    from transformers import LogitsProcessorList

    from jax_implicit import batching, generate, rules, serving

    new = cfg.new_tokens
    tok, ours, hf = load_both(cfg.model, torch)
    tables = rules.build(cfg.rules, tok, ours.cfg.vocab_size, tok.eos_token_id)
    eos = serving.eos_ids_for(ours.cfg, tok)
    rows = [r for name, n in WORKLOAD for r in generate.read_instructions(name, min(n, cfg.limit or n))]
    prompts = dict(enumerate(serving.encode_all(tok, [r["instruction"] for r in rows], cfg.tag_set, new,
                                               ours.cfg.max_position_embeddings)))
    print(machine(jax, torch))
    print(f"workload: {len(rows)} instructions, up to {new} new tokens, stop at EOS {eos}, "
          f"rules {rules.variant(cfg.rules)}")

    first_call, later = None, 0  # the end of the first decoding call, and the tokens of the calls after it

    def tokens(n):
        nonlocal first_call, later
        if first_call is None:
            first_call = time.perf_counter()
        else:
            later += n

    loaded = []  # programs that JAX's persistent compilation cache held (`cli.persistent_cache`)
    hit = "/jax/compilation_cache/cache_hits"
    jax.monitoring.register_event_listener(lambda event, **_: loaded.append(event == hit))
    start = time.perf_counter()
    got = {}
    for group in serving.serve(ours, prompts, eos, max_new_tokens=new, rules=tables, batch_size=cfg.batch_size,
                              bucket=cfg.bucket, on_tokens=tokens):
        got |= group
    wall = time.perf_counter() - start
    n_ours = sum(map(len, got.values()))
    after_first = f"{later / (time.perf_counter() - first_call):.1f} tok/s" if later else "- (one call)"
    print(f"ours: {n_ours} useful tokens in {wall:.1f} s = {n_ours / wall:.1f} tok/s; after the first decoding call "
          f"(compilation excluded) {after_first} of all tokens decoded "
          f"({min(cfg.batch_size, len(prompts))} slots, continuous batching; {sum(loaded)} compiled programs loaded "
          f"from JAX's persistent cache; load {os.getloadavg()[0]:.1f})", flush=True)

    hf_tables = host_tables(tables)
    order = sorted(prompts, key=lambda k: len(prompts[k].ids))
    results = {}
    for batch, setting in itertools.product(cfg.hf_batch_sizes, cfg.hf_threads):
        out = {}

        def run_hf():
            for s in range(0, len(order), batch):
                chunk = order[s:s + batch]
                ids, mask, seen = batching.left_pad([prompts[k] for k in chunk], len(chunk),
                                                    len(prompts[chunk[-1]].ids), tok.pad_token_id)
                processor = hf_rule_processor(hf_tables, ids.shape[1], seen_ids(ids, seen, ours.cfg.vocab_size), torch)
                with torch.no_grad():
                    gen = hf.generate(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long(), max_new_tokens=new,
                                      do_sample=False, eos_token_id=list(eos),
                                      pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([processor]))
                for r, k in enumerate(chunk):
                    out[k] = useful(gen[r, ids.shape[1]:].tolist(), eos)

        t = time.perf_counter()
        with_threads(torch, setting, run_hf)()
        hf_wall = time.perf_counter() - t
        n_hf = sum(map(len, out.values()))
        side = f"batch {batch}, {thread_count(torch, setting)} thread(s)"
        results[side] = (n_hf / hf_wall, hf_wall, out)
        print(f"transformers {side}: {n_hf} useful tokens in {hf_wall:.1f} s = {n_hf / hf_wall:.1f} tok/s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    best = max(results, key=lambda b: results[b][0])
    rate, hf_wall, out = results[best]
    same = sum(got[k] == out[k] for k in prompts)
    print(f"ratio (useful tok/s, ours incl. compilation / transformers {best}): {n_ours / wall / rate:.2f}x; "
          f"wall {wall:.1f} s vs {hf_wall:.1f} s; identical responses {same}/{len(prompts)}")


if __name__ == "__main__":
    cli.main(run, "configs/bench/generate.py")
