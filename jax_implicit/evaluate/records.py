"""Reading rows of JSON/JSONL files with errors that name the file, row and key, and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence


def read_rows(path: str | Path, required: Sequence[str] = (), what: str = "file") -> list[dict]:
    """The rows of a JSON list or JSONL file; each must hold the `required` keys as strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{what} {path} must hold a list of rows, found {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{what} {path} is empty: it has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{what} {path}, row {i}: expected an object, found {type(row).__name__}")
        for key in required:
            if not isinstance(row.get(key), str):
                found = "is missing" if key not in row else f"is {type(row[key]).__name__}, not a string"
                raise ValueError(f"{what} {path}, row {i}: key {key!r} {found}")
    return rows


def check_same_instructions(a: list[dict], b: list[dict], a_name: str, b_name: str) -> None:
    """Both files must hold the same instructions, each once: head-to-head pairs rows by instruction."""
    for rows, name in ((a, a_name), (b, b_name)):
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            if row["instruction"] in first:
                raise ValueError(f"{name}: row {i} repeats the instruction of row {first[row['instruction']]}: "
                                 f"{row['instruction'][:80]!r}")
            first[row["instruction"]] = i
    for (rows, name), (other, other_name) in (((a, a_name), (b, b_name)), ((b, b_name), (a, a_name))):
        known = {r["instruction"] for r in other}
        missing = [i for i, r in enumerate(rows) if r["instruction"] not in known]
        if missing:
            raise ValueError(f"outputs and references hold different instructions: {len(missing)} of the {len(rows)} "
                             f"in {name} are not in {other_name}, first row {missing[0]}: "
                             f"{rows[missing[0]]['instruction'][:80]!r}")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write via a temporary sibling renamed into place, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
