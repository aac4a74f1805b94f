"""The end-to-end evaluation workload: the 56 validation instructions and the first 200 AlpacaEval
instructions, the three rules, up to `--new_tokens` tokens stopping at EOS; our continuous-batching decoder
(`serving.serve`) against transformers `generate` with the equivalent rule LogitsProcessor, in one process.

    .venv/bin/python benchmarks/generate.py [--limit=8] [--new_tokens=512] [--hf_batch_sizes=8,16]

Reported: useful tokens (before EOS) per second and wall time for each side (ours with and without its
compilations), transformers at its best batch size, the ratio, and how many responses agree token for token.
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

from benchmarks.common import hf_rule_processor, host_tables, machine, seen_ids, with_threads  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "generate.py"), "generation config")
_LIMIT = flags.DEFINE_integer("limit", 0, "take at most this many instructions from each dataset (0: 56 + 200)")
_NEW = flags.DEFINE_integer("new_tokens", 512, "response tokens at most")
_HF_BATCHES = flags.DEFINE_list("hf_batch_sizes", ["8", "16"], "transformers batch sizes to try (the best counts)")
_HF_THREADS = flags.DEFINE_string("hf_threads", "1", "torch threads for transformers ('default' or a number)")
WORKLOAD = (("val", 56), ("alpaca_eval", 200))


def useful(row, eos) -> list[int]:
    """The response ids before the first EOS."""
    row = list(row)
    return row[:min((row.index(e) for e in eos if e in row), default=len(row))]


def main(argv):
    del argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from jax_implicit import convert, generate, rules, serving

    cfg, new = _CONFIG.value, _NEW.value
    tok = convert.load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    ours = convert.load_hf(cfg.model.path, param_dtype="float32", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    tables = rules.build(cfg.rules, tok, ours.cfg.vocab_size, tok.eos_token_id)
    eos = serving.eos_ids_for(ours.cfg, tok)
    rows = [r for name, n in WORKLOAD for r in generate.read_instructions(name, min(n, _LIMIT.value or n))]
    prompts = dict(enumerate(serving.encode_all(tok, [r["instruction"] for r in rows], cfg.decode.tag_set, new,
                                               ours.cfg.max_position_embeddings)))
    print(machine(jax, torch))
    print(f"workload: {len(rows)} instructions, up to {new} new tokens, stop at EOS {eos}, rules {rules.variant(cfg.rules)}")

    first_step = None

    def tokens(_):
        nonlocal first_step
        first_step = first_step or time.perf_counter()

    start = time.perf_counter()
    got = {}
    for group in serving.serve(ours, prompts, eos, max_new_tokens=new, rules=tables, batch_size=cfg.decode.batch_size,
                              bucket=cfg.decode.bucket, on_tokens=tokens):
        got |= group
    wall = time.perf_counter() - start
    n_ours = sum(map(len, got.values()))
    print(f"ours: {n_ours} useful tokens in {wall:.1f} s = {n_ours / wall:.1f} tok/s; from the first finished step "
          f"(compilation excluded) {n_ours / (time.perf_counter() - first_step):.1f} tok/s "
          f"({min(cfg.decode.batch_size, len(prompts))} slots, continuous batching; load {os.getloadavg()[0]:.1f})", flush=True)

    hf_tables = host_tables(tables)
    order = sorted(prompts, key=lambda k: len(prompts[k].ids))
    threads = None if _HF_THREADS.value == "default" else int(_HF_THREADS.value)
    results = {}
    for batch in (int(b) for b in _HF_BATCHES.value):
        out = {}

        def run_hf():
            for s in range(0, len(order), batch):
                chunk = order[s:s + batch]
                ids, mask, seen = serving.pad_batch([prompts[k] for k in chunk], len(chunk), 1, tok.pad_token_id)
                processor = hf_rule_processor(hf_tables, ids.shape[1], seen_ids(ids, seen, ours.cfg.vocab_size), torch)
                with torch.no_grad():
                    gen = hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                      max_new_tokens=new, do_sample=False, eos_token_id=list(eos),
                                      pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([processor]))
                for r, k in enumerate(chunk):
                    out[k] = useful(gen[r, ids.shape[1]:].tolist(), eos)

        t = time.perf_counter()
        with_threads(torch, threads, run_hf)()
        hf_wall = time.perf_counter() - t
        n_hf = sum(map(len, out.values()))
        results[batch] = (n_hf / hf_wall, hf_wall, out)
        print(f"transformers batch {batch}: {n_hf} useful tokens in {hf_wall:.1f} s = {n_hf / hf_wall:.1f} tok/s "
              f"({threads or torch.get_num_threads()} thread(s); load {os.getloadavg()[0]:.1f})", flush=True)
    best = max(results, key=lambda b: results[b][0])
    rate, hf_wall, out = results[best]
    same = sum(got[k] == out[k] for k in prompts)
    print(f"ratio (useful tok/s, ours incl. compilation / transformers batch {best}): {n_ours / wall / rate:.2f}x; "
          f"wall {wall:.1f} s vs {hf_wall:.1f} s; identical responses {same}/{len(prompts)}")


if __name__ == "__main__":
    app.run(main)
