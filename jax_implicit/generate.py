"""`python -m jax_implicit.generate --config=configs/generate.py [--config.a.b=v ...]`

Reads instructions (a JSON/JSONL file, or the dataset names `val` / `alpaca_eval`), decodes them
with the compiled decoder and, unless switched off, the rule-based adapter, and writes an
AlpacaEval-format JSON list of {instruction, output, generator, dataset}. Everything that can be
checked (config values, the instruction file, prompt lengths) is checked before the model loads.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from absl import logging
from ml_collections import ConfigDict

from jax_implicit import datasets, files, partial, runlock

def read_instructions(spec: str, limit: int = 0) -> list[dict]:
    """Rows {instruction, dataset} from a dataset name (`val`, `alpaca_eval`), a JSON/JSONL file or a hub id.
    Every row must carry a string `instruction`."""
    source = datasets.resolve(spec, flag="--config.data.instructions")
    if source.path is None:
        rows = datasets.hub_rows(source)
    else:
        rows = files.read_rows(source.path, required=("instruction",), what="instructions")
    out = [{"instruction": r["instruction"], "dataset": r.get("dataset", Path(spec).stem)} for r in rows]
    return out[:limit] if limit else out


def names(cfg: ConfigDict) -> tuple[str, Path]:
    """The generator label written into each row and the output file: both name the decoding variant
    (greedy, rules, rules-no_eos, ...), so the ablations never overwrite each other."""
    from jax_implicit import rules

    generator = cfg.generator or f"{Path(cfg.model.path).name}-{rules.variant(cfg.rules if cfg.use_rules else None)}"
    return generator, Path(cfg.output or f"outputs/generate/{generator}-{Path(cfg.data.instructions).stem}.json")


def run(cfg: ConfigDict, devices: list | None = None) -> Path:
    """Decode every instruction of `cfg.data.instructions` on the mesh of `cfg.mesh` (over `devices`, default
    all); returns the output path. Weights are read into their shards and the KV cache is sharded like
    them (`sharding.py`); process 0 writes."""
    from tqdm import tqdm

    from jax_implicit import decode, distributed, model, pinning, pretrained, rules, serving
    from jax_implicit.sharding import Sharder

    import jax

    if not jax.distributed.is_initialized():
        distributed.initialize()  # multi-host (from the environment); a no-op on one host
    if cfg.use_rules:
        rules.validate(cfg.rules)
    d = cfg.decode
    decode.check_settings(d.max_new_tokens, d.batch_size, d.bucket, d.temperature, d.top_p)
    rows = read_instructions(cfg.data.instructions, cfg.data.limit)
    path, tokenizer = pretrained.locate(cfg.model)
    mcfg = model.from_hf_config(path)
    try:  # before loading weights: a prompt that does not fit is a config error
        serving.encode_all(tokenizer, [r["instruction"] for r in rows], d.tag_set, d.max_new_tokens,
                          mcfg.max_position_embeddings)
    except ValueError as err:
        raise ValueError(f"{cfg.data.instructions}: {err}") from None
    generator, output = names(cfg)
    lock = runlock.hold(runlock.beside(output), f"output {output}") if distributed.is_writer() else nullcontext()
    sh = Sharder.from_config(cfg.mesh, devices)
    with lock, pinning.active(sh):  # the writer's lock also proves the folder writable, before the model loads
        keep = partial.Partial(partial.path_for(output), dict(config=json.loads(cfg.to_json_best_effort()),
                                                              rows=rows, weights=partial.stamp(path)))
        decoder = model.unstack(pretrained.load(cfg.model, sh, path))  # held as decoding holds it, once
        tables = rules.build(cfg.rules, tokenizer, mcfg.vocab_size, tokenizer.eos_token_id) if cfg.use_rules else None

        bar = tqdm(unit="tok", desc=generator, disable=not distributed.is_writer())
        start, produced = time.perf_counter(), 0
        first_step, since_first = None, 0  # tokens/s from the first finished step: compilation excluded

        def progress(batch: dict[int, str], new_tokens: int) -> None:
            nonlocal produced
            if distributed.is_writer():
                keep.add([str(k) for k in batch], list(batch.values()))
            produced += new_tokens
            bar.set_postfix(instructions=f"{len(keep.items)}/{len(rows)}", tok_per_s=rate())

        def tokens(n: int) -> None:
            nonlocal first_step, since_first
            if first_step is None:
                first_step = time.perf_counter()
            else:
                since_first += n
            bar.update(n)
            bar.set_postfix(instructions=f"{len(keep.items)}/{len(rows)}", tok_per_s=rate(), refresh=False)

        def rate() -> str:
            elapsed = time.perf_counter() - first_step if first_step is not None else 0.0
            return f"{since_first / elapsed:.1f}" if elapsed > 0 else "-"

        outputs = serving.generate_texts(
            decoder, tokenizer, [r["instruction"] for r in rows], max_new_tokens=d.max_new_tokens, rules=tables,
            tag_set=d.tag_set, batch_size=d.batch_size, bucket=d.bucket, temperature=d.temperature, top_p=d.top_p,
            seed=d.seed, on_batch=progress, done={int(k): v for k, v in keep.items.items()}, sharder=sh,
            on_tokens=tokens)
        bar.close()
        if distributed.is_writer():
            files.write_atomic(output, json.dumps([{"instruction": r["instruction"], "output": o, "generator": generator,
                                                 "dataset": r["dataset"]} for r, o in zip(rows, outputs)], indent=2))
            keep.finish()
    logging.info("%d responses, %d tokens, %.1f tokens/s -> %s", len(rows), produced,
                 produced / (time.perf_counter() - start), output)
    return output


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(run, "configs/generate.py")
