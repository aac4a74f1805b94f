"""Decoding throughput: the compiled decoder with the three rules vs transformers `generate` with an
equivalent rule LogitsProcessor (KV cache on), on the same prompts, in one process.

    .venv/bin/python -m benchmarks.decode [--config.batch_sizes=1,16] [--config.reps=3]   # --help: the settings

Both sides produce exactly `new_tokens` tokens per row (EOS never stops ours; `min_new_tokens`
forces HF's). transformers runs once with torch's default threads and once with one thread (on a loaded 2-core
machine OpenMP's second thread can make small ops several times slower); the faster is the baseline.
Then runs alternate between ours and that baseline, and the best of `reps` is reported, because
the CPU is shared. Also printed: the batch-1 bound set by memory
bandwidth (every weight is read once per decoding step).
"""

from __future__ import annotations

import os
import time

from ml_collections import ConfigDict

from benchmarks.common import (copy_bandwidth, hf_rule_processor, host_tables, load_both, machine, seen_ids,
                               thread_count, with_threads)
from jax_implicit import cli


def run(cfg: ConfigDict) -> None:
    import jax
    import numpy as np
    import torch
    from transformers import LogitsProcessorList

    from jax_implicit import batching, decode, generate, rules, serving

    new = cfg.new_tokens
    tok, ours, hf = load_both(cfg.model, torch)
    tables = rules.build(cfg.rules, tok, ours.cfg.vocab_size, tok.eos_token_id)
    hf_tables = host_tables(tables)
    rows = generate.read_instructions(cfg.prompts)
    encoded = [serving.encode(tok, r["instruction"], cfg.tag_set) for r in rows]

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(ours))
    bandwidth = copy_bandwidth()
    print(machine(jax, torch))
    print(f"weights {weight_bytes / 1e6:.0f} MB float32; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write) "
          f"-> batch-1 bound {bandwidth / weight_bytes:.1f} tokens/s")

    for batch in cfg.batch_sizes:
        ids, mask, seen = batching.left_pad(encoded[:batch], batch, max(len(p.ids) for p in encoded[:batch]),
                                            tok.pad_token_id or 0)  # as transformers pads
        seen_v = seen_ids(ids, seen, ours.cfg.vocab_size)

        def run_ours():
            out, _ = decode.generate(ours, ids, mask, seen_mask=seen, max_new_tokens=new, rules=tables, eos_ids=())
            return np.asarray(out)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                  logits_processor=LogitsProcessorList(
                                      [hf_rule_processor(hf_tables, ids.shape[1], seen_v, torch)]),
                                  pad_token_id=tok.pad_token_id)
            return out[:, ids.shape[1]:].numpy()

        outputs = {}

        def timed(name, fn) -> float:
            t = time.perf_counter()
            outputs[name] = fn()
            return time.perf_counter() - t

        run_ours()  # compiles
        hf_sides = {f"transformers {thread_count(torch, n)} thread(s)":
                    with_threads(torch, n, run_hf) for n in cfg.hf_threads}
        first = {name: timed(name, fn) for name, fn in hf_sides.items()}  # also their warm-up
        hf_name = min(first, key=first.get)  # the faster one is the baseline, timed alongside ours
        times = {"ours": [], hf_name: []}
        for _ in range(cfg.reps):
            times["ours"].append(timed("ours", run_ours))
            times[hf_name].append(timed(hf_name, hf_sides[hf_name]))
        tps = {k: batch * new / min(v) for k, v in times.items()}
        other = {k: batch * new / v for k, v in first.items() if k != hf_name}
        ours_out, hf_out = outputs["ours"], outputs[hf_name]
        eos_at = [list(r).index(tok.eos_token_id) if tok.eos_token_id in r else new for r in ours_out]
        same = np.mean([(o[:n] == h[:n]).all() for o, h, n in zip(ours_out, hf_out, eos_at)])
        print(f"batch {batch:3d}: ours {tps['ours']:.1f} tok/s, {hf_name} {tps[hf_name]:.1f} tok/s, ratio "
              f"{tps['ours'] / tps[hf_name]:.2f}x (best of {cfg.reps}; "
              + "".join(f"{k}: {v:.1f} tok/s in its warm-up run; " for k, v in other.items())
              + f"prompt width {ids.shape[1]}; rows equal up to our first EOS {same:.0%}; "
              f"load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    cli.main(run, "configs/bench/decode.py")
