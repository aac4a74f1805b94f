"""Work kept as it is done: finished batches of a long evaluation are appended to a partial file beside its
output, so that a run that dies midway loses at most the batch in flight and its rerun goes on from there.

The file is JSON Lines: a header naming the settings the work belongs to, then one `{"key", "value"}` line
per finished item. Each batch is appended with one `write` and fsynced; a tail cut short by a kill (no
final newline, or a line that does not parse) is dropped when the file is read. A rerun computes only the
batches not all of whose items are there, in the same batches as before, so its final output is
byte-identical to an uninterrupted run's; the file is removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


def digest(obj: Any) -> str:
    """A short content hash of a JSON-able object (settings, the list of inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stamp(folder: str | Path) -> list:
    """Names, sizes and modification times of a folder's files: a model retrained in place changes it."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.partial")


class Partial:
    """The finished items of one piece of work; `identity` (JSON-able) names its settings and inputs."""

    def __init__(self, path: str | Path, identity: Any):
        self.path = Path(path)
        self.header = {"partial": digest(identity)}
        self.items: dict[str, Any] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        lines, good = raw.split(b"\n"), 0  # the last element is what follows the final newline
        for line in lines[:-1]:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if good == 0 and row != self.header:
                raise ValueError(f"{self.path} holds work done with other settings or inputs; delete it to start "
                                 f"afresh, or rerun with the settings it was made with")
            if good:
                self.items[row["key"]] = row["value"]
            good += len(line) + 1
        if good == 0:
            self.path.unlink()
        elif good < len(raw):
            os.truncate(self.path, good)  # a batch cut short by a kill

    def _append(self, rows: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, keys: Sequence[str]) -> list | None:
        """The values of all `keys`, or None unless every one is done."""
        return [self.items[k] for k in keys] if all(k in self.items for k in keys) else None

    def add(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        """Record one finished batch (one write, fsynced); the file is made with the first batch."""
        rows = [{"key": k, "value": v} for k, v in zip(keys, values)]
        self._append(rows if self.path.is_file() else [self.header, *rows])
        self.items.update(zip(keys, values))

    def finish(self) -> None:
        """The output is written: the partial file is no longer needed."""
        self.path.unlink(missing_ok=True)
