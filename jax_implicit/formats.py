"""The paper's datasets as rows of the authors' `messages` format, each built exactly as their
`data/processed/*/make_*.py` script built it (`{"dataset", "id", "messages": [{"role", "content"}]}`).

A format only converts rows; where they come from is `datasets.CATALOG`'s job and reading them `data.py`'s.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Iterable, Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data or data settings, reported before anything compiles."""


def field(row: dict, key: str, where: str):
    if not isinstance(row, dict) or row.get(key) is None:
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: missing field {key!r} (row has {have})")
    return row[key]


def _chat(name: str, i: int, user: str, assistant: str) -> dict:
    return {"dataset": name, "id": f"{name}_{i}",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _lima(rows: Iterable[tuple[int, dict]], where: Callable[[int], str]) -> Iterator[dict]:
    """GAIR/lima rows hold `conversations`, alternating user and assistant turns."""
    for i, row in rows:
        turns = field(row, "conversations", where(i))
        roles = ("user", "assistant")
        yield {"dataset": "lima", "id": f"lima_{i}",
               "messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]}


def _with_input(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


def _alpaca(rows, where) -> Iterator[dict]:
    for i, row in rows:
        user = _with_input(field(row, "instruction", where(i)), row.get("input") or "")
        yield _chat("alpaca", i, user, field(row, "output", where(i)))


def _dolly(rows, where) -> Iterator[dict]:
    """databricks-dolly-15k (`instruction, context, response`) or its `instruction, input, output` copies."""
    for i, row in rows:
        answer = "response" if "response" in row else "output"
        user = _with_input(field(row, "instruction", where(i)), row.get("context") or row.get("input") or "")
        yield _chat("dolly", i, user, field(row, answer, where(i)))


def _gsm8k(rows, where) -> Iterator[dict]:
    for i, row in rows:
        yield _chat("gsm8k", i, field(row, "question", where(i)), field(row, "answer", where(i)))


def _mbpp(rows, where) -> Iterator[dict]:
    for i, row in rows:
        yield _chat("mbpp", i, field(row, "text", where(i)), field(row, "code", where(i)))


def _poetry(rows, where) -> Iterator[dict]:
    for i, row in rows:
        if not isinstance(row, dict) or "poem name" not in row:
            field(row, "poem name", where(i))
        if row["poem name"] is None:  # the authors skipped unnamed poems
            continue
        yield _chat("merve_poetry", i, "Write a poem called " + row["poem name"], field(row, "content", where(i)))


def _recipes(rows, where) -> Iterator[dict]:
    for i, row in rows:
        ingredients = field(row, "Cleaned_Ingredients", where(i))
        if isinstance(ingredients, str):  # the hub stores a Python list literal
            try:
                ingredients = ast.literal_eval(ingredients)
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{where(i)}: Cleaned_Ingredients is not a list literal ({e})") from None
        body = "".join(f" - {x}\n" for x in ingredients) + "\n\n" + field(row, "Instructions", where(i))
        yield _chat("kfr", i, "Recipe for " + field(row, "Title", where(i)), body)


def _chess(rows, where) -> Iterator[dict]:
    """chess-pgn-games holds one PGN line per row: a game is its WhiteElo and BlackElo lines, then its moves."""
    elo: list[str] = []
    for i, row in rows:
        text = field(row, "text", where(i))
        if "WhiteElo" in text or "BlackElo" in text:
            elo.append(text)
        elif text.startswith("1. "):
            if len(elo) != 2:
                raise DataError(f"{where(i)}: moves line without exactly one WhiteElo and one BlackElo line before it")
            yield {"dataset": "pgn-patrickfrank1", "id": f"pgn-patrickfrank1-{i}",
                   "messages": [{"role": "user", "content": elo[0] + "\n" + elo[1] + "\n"},
                                {"role": "assistant", "content": text}]}
            elo = []


def check_messages(row: dict, where: str) -> dict:
    """A row already in the authors' format (their own files load unchanged), checked."""
    messages = field(row, "messages", where)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {k} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message")
    return row


@dataclasses.dataclass(frozen=True)
class Format:
    """How a dataset's rows become `messages` rows (where they come from is `datasets.CATALOG`'s job)."""

    convert: Callable
    source_rows: int | None = None  # the authors read only the first N rows of the source
    examples: int | None = None  # ... or stopped after N examples


DATASETS: dict[str, Format] = {
    "lima": Format(_lima),
    "alpaca": Format(_alpaca),
    "dolly": Format(_dolly),
    "gsm8k": Format(_gsm8k, source_rows=1000),
    "mbpp": Format(_mbpp, source_rows=1000),
    "poetry": Format(_poetry, source_rows=1000),
    "recipes": Format(_recipes, source_rows=1000),
    "chess": Format(_chess, examples=1000),
}
