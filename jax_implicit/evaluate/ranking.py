"""Response-ranking capability (the paper's Table 2).

For each of the first `n` examples, score = exp(mean log-probability of the response tokens and
EOS given the evaluation prompt of the instruction), for the real response and for `k` responses
of other examples drawn at random (seeded, with replacement). The capability is the fraction of
(real - random) score differences above 0. Text is tokenized as the authors' `ratio_eval.py` does:
prompt + response + EOS in one string, with the first len(tokenize(prompt)) tokens unscored.

    python -m jax_implicit.evaluate.ranking --config=configs/eval/ranking.py \
        --config.data=tatsu-lab/alpaca --config.run.base=smollm2-135m --config.run.method=base
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_implicit import datasets, files, partial, pinning, pretrained, prompts, runlock
from jax_implicit.evaluate import layout, scoring


def load_examples(spec: str, n: int) -> list[dict]:
    """The first `n` rows with `instruction`, `output` (and optional `input`): a dataset name (`dolly`), a
    JSON/JSONL file or a hub id (`tatsu-lab/alpaca`)."""
    source = datasets.resolve(spec, flag="--config.data")
    if source.path is not None:
        rows = files.read_rows(source.path, ("instruction", "output"), "ranking data")[:n]
    else:
        rows = datasets.hub_rows(dataclasses.replace(source, split=f"{source.split}[:{n}]"))
        if not rows or "instruction" not in rows[0] or "output" not in rows[0]:
            raise ValueError(f"dataset {spec!r} has no rows with 'instruction' and 'output'")
    for i, row in enumerate(rows):
        if not isinstance(row.get("input", ""), str):
            raise ValueError(f"ranking data {source}, row {i}: key 'input' is not a string")
    if len(rows) < 2:
        raise ValueError(f"ranking data {source} has {len(rows)} row(s); ranking needs at least 2")
    return rows


def user_text(row: dict) -> str:
    """Instruction, then the input (if any) after a blank line, as open-instruct formats Alpaca."""
    extra = row.get("input", "").strip()
    return f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]


def pairings(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) indices of other examples, uniform with replacement, never the example itself."""
    j = np.random.default_rng(seed).integers(0, n - 1, size=(n, k))
    return j + (j >= np.arange(n)[:, None])


def encode(tokenizer, instruction: str, response: str, tag_set: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS and the index of the first scored token."""
    prompt = prompts.generation_prompt(instruction, tag_set)
    start = len(tokenizer(prompt)["input_ids"])
    return list(tokenizer(prompt + response.strip() + tokenizer.eos_token)["input_ids"]), start


def rank(decoder, tokenizer, rows: list[dict], *, k: int, seed: int, tag_set: str = "user_assistant",
         max_seq_length: int = 2048, batch_tokens: int = 4096, keep: partial.Partial | None = None) -> dict:
    """The ranking capability and every score behind it (real: (n,), random: (n, k)).

    Sequences are cut on the right at `max_seq_length` (and the model's context), as in training.
    `keep` holds the scores of finished batches (a rerun computes only the rest).
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; ranking scores the response and EOS")
    n = len(rows)
    others = pairings(n, k, seed)
    pairs = [(i, i) for i in range(n)] + [(i, int(j)) for i in range(n) for j in others[i]]
    encoded = [encode(tokenizer, user_text(rows[i]), rows[j]["output"], tag_set) for i, j in pairs]
    cut = min(max_seq_length, decoder.cfg.max_position_embeddings)
    seqs = [ids[:cut] for ids, _ in encoded]
    for (i, j), s, (_, start) in zip(pairs, seqs, encoded):
        if start >= len(s):
            raise ValueError(f"example {i}: its prompt fills all {cut} tokens, leaving none of response {j} to score")
    total, count = scoring.continuation_logprobs(decoder, seqs, [e[1] for e in encoded], batch_tokens=batch_tokens,
                                                 desc="ranking", keep=keep)
    score = np.exp(total / count)
    real, random = score[:n], score[n:].reshape(n, k)
    return dict(fraction=float(np.mean(real[:, None] - random > 0)), n_examples=n, k=k, seed=seed,
                truncated=sum(len(ids) > cut for ids, _ in encoded), real=real.tolist(), random=random.tolist(),
                others=others.tolist())


def run(cfg) -> dict:
    if cfg.k < 1 or cfg.n < 2:
        raise ValueError(f"need k >= 1 and n >= 2, got k={cfg.k}, n={cfg.n}")
    prompts.tags(cfg.tag_set)
    out = layout.out_path(cfg, layout.RANKING)
    rows = load_examples(cfg.data, cfg.n)
    with runlock.hold(runlock.beside(out), f"output {out}"):  # also: the folder is writable, before any model work
        keep = partial.Partial(partial.path_for(out), dict(model=cfg.model.to_dict(), batch_tokens=cfg.batch_tokens,
                                                           weights=partial.stamp(pretrained.model_dir(cfg.model.path))))
        from jax_implicit.sharding import Sharder

        sh = Sharder.from_config(cfg.mesh) if cfg.sharded else None
        with pinning.active(sh):
            decoder, tokenizer = pretrained.load_with_tokenizer(cfg.model, sh)
            result = rank(decoder, tokenizer, rows, k=cfg.k, seed=cfg.run.seed, tag_set=cfg.tag_set,
                          max_seq_length=cfg.max_seq_length, batch_tokens=cfg.batch_tokens, keep=keep)
        result.update(model=str(cfg.model.path), data=str(cfg.data))
        files.write_json(out, result)
        keep.finish()
    print(f"response ranking capability of {cfg.model.path}: {result['fraction']:.4f} "
          f"({result['n_examples']} examples x {cfg.k} random responses, seed {cfg.run.seed}) -> {out}")
    return result


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(run, "configs/eval/ranking.py")
