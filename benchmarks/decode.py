"""Decoding throughput: the compiled decoder with the three rules vs transformers `generate` with an
equivalent rule LogitsProcessor (KV cache on), on the same prompts, in one process.

    .venv/bin/python benchmarks/decode.py [--config=configs/generate.py] [--batch_sizes=1,16] [--reps=3]

Both sides produce exactly `--new_tokens` tokens per row (EOS never stops ours; `min_new_tokens`
forces HF's). transformers runs once with torch's default threads and once with one thread (on a loaded 2-core
machine OpenMP's second thread can make small ops several times slower); the faster is the baseline.
Then runs alternate between ours and that baseline, and the best of `--reps` is reported, because
the CPU is shared. Also printed: the batch-1 bound set by memory
bandwidth (every weight is read once per decoding step).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import copy_bandwidth, hf_rule_processor, host_tables, machine, seen_ids, with_threads  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "generate.py"), "generation config")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "16"], "batch sizes to time")
_NEW = flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
_REPS = flags.DEFINE_integer("reps", 3, "timed repetitions per side (best is reported)")
_HF_THREADS = flags.DEFINE_list("hf_threads", ["default", "1"], "torch thread settings to try for transformers")
_PROMPTS = flags.DEFINE_string("prompts", "val",
                               "instructions file (JSON/JSONL) or dataset name")


def main(argv):
    del argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from jax_implicit import convert, decode, generate, rules, serving

    cfg = _CONFIG.value
    new = _NEW.value
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    ours = convert.load_hf(cfg.model.path, param_dtype="float32", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    tables = rules.build(cfg.rules, tok, ours.cfg.vocab_size, tok.eos_token_id)
    hf_tables = host_tables(tables)
    rows = generate.read_instructions(_PROMPTS.value)
    encoded = [serving.encode(tok, r["instruction"], cfg.decode.tag_set) for r in rows]

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(ours))
    bandwidth = copy_bandwidth()
    print(machine(jax, torch))
    print(f"weights {weight_bytes / 1e6:.0f} MB float32; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write) "
          f"-> batch-1 bound {bandwidth / weight_bytes:.1f} tokens/s")

    for batch in (int(b) for b in _BATCHES.value):
        ids, mask, seen = serving.pad_batch(encoded[:batch], batch, 1, tok.pad_token_id or 0)
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
        hf_sides = {f"transformers {n if n != 'default' else torch.get_num_threads()} thread(s)":
                    with_threads(torch, None if n == "default" else int(n), run_hf) for n in _HF_THREADS.value}
        first = {name: timed(name, fn) for name, fn in hf_sides.items()}  # also their warm-up
        hf_name = min(first, key=first.get)  # the faster one is the baseline, timed alongside ours
        times = {"ours": [], hf_name: []}
        for _ in range(_REPS.value):
            times["ours"].append(timed("ours", run_ours))
            times[hf_name].append(timed(hf_name, hf_sides[hf_name]))
        tps = {k: batch * new / min(v) for k, v in times.items()}
        other = {k: batch * new / v for k, v in first.items() if k != hf_name}
        ours_out, hf_out = outputs["ours"], outputs[hf_name]
        eos_at = [list(r).index(tok.eos_token_id) if tok.eos_token_id in r else new for r in ours_out]
        same = np.mean([(o[:n] == h[:n]).all() for o, h, n in zip(ours_out, hf_out, eos_at)])
        print(f"batch {batch:3d}: ours {tps['ours']:.1f} tok/s, {hf_name} {tps[hf_name]:.1f} tok/s, ratio "
              f"{tps['ours'] / tps[hf_name]:.2f}x (best of {_REPS.value}; "
              + "".join(f"{k}: {v:.1f} tok/s in its warm-up run; " for k, v in other.items())
              + f"prompt width {ids.shape[1]}; rows equal up to our first EOS {same:.0%}; "
              f"load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    app.run(main)
