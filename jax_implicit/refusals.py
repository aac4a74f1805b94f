"""Refusals mixed into a tuning set: Response Tuning's contextual refusals and the implicit-ins authors' own.

`contextual` is Response Tuning's `generate_refusal_mixture.py` (data/README.md, "Response Tuning protocol"):
the Safety-Tuned LLaMAs rows whose stripped, lower-cased answer contains the whole word `ai` or `sorry`
(1,829 of 2,483), their positions shuffled by `random.seed(seed)` as that script does, the first `n` kept and
appended after the training set. `selective` is the implicit-ins authors' 29 short refusals with empty user
turns, put before the training set: with LIMA in response mode that reproduces their
`lima_no_instruction_plus_refusal.jsonl` row for row. Rows come out in the `messages` format; the tuning
mode is applied afterwards, so in response tuning a refusal keeps only its answer, like every other example.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ml_collections import ConfigDict

from jax_implicit import datasets, files

KINDS = ("", "contextual", "selective")
DATASETS = {"contextual": "safety_tuned_llamas", "selective": "refusal_selective"}  # kind -> dataset name
CONTEXTUAL = re.compile(r"\b(ai|sorry)\b")


def refusal_config(kind: str = "", path: str = "", n: int = 100, seed: int = 0) -> ConfigDict:
    """`kind`: "" (none), "contextual" or "selective"; `path`: another file than the shipped one;
    `n`: refusals kept (Response Tuning's `--num_safety_examples`, 100 by default there; 0: all); `seed`: its shuffle."""
    return ConfigDict(dict(kind=kind, path=path, n=n, seed=seed))


def source(cfg: ConfigDict) -> Path:
    return Path(cfg.path) if cfg.path else datasets.path(DATASETS[cfg.kind])


def contextual(path: str | Path) -> list[tuple[int, dict]]:
    """(file row, messages row) of every row that passes Response Tuning's contextual filter, in file order."""
    rows = files.read_rows(path, ("instruction", "output"), "refusal file")
    out = []
    for i, row in enumerate(rows):
        extra = row.get("input") or ""
        prompt = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
        if CONTEXTUAL.search(row["output"].strip().lower()):
            out.append((i, {"dataset": "safety_tuned_llamas", "id": f"safety_{i}",
                            "messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": row["output"]}]}))
    if not out:
        raise ValueError(f"refusal file {path}: no row's output contains the word 'ai' or 'sorry'")
    return out


def sample(count: int, n: int, seed: int) -> list[int]:
    """The first `n` of `count` positions shuffled as `random.seed(seed); random.shuffle(positions)` does."""
    positions = list(range(count))
    random.Random(seed).shuffle(positions)
    return positions[:n] if n else positions


def refusals(cfg: ConfigDict) -> list[dict]:
    """The refusal rows `cfg` asks for, in the order they are mixed in (`data.load_rows` places them)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown refusals.kind {cfg.kind!r}; expected one of {KINDS}")
    if cfg.n < 0:
        raise ValueError(f"refusals.n={cfg.n}; use 0 for all refusals")
    path = source(cfg)
    if cfg.kind == "selective":
        rows = files.read_rows(path, what="refusal file")
        rows = rows[:cfg.n] if cfg.n else rows
    else:
        kept = contextual(path)
        if cfg.n > len(kept):
            raise ValueError(f"refusals.n={cfg.n}, but only {len(kept)} rows of {path} pass the contextual filter")
        rows = [kept[k][1] for k in sample(len(kept), cfg.n, cfg.seed)]
    return rows

