"""How files are read and written: config files, JSON rows with errors that name the file, row and key, and
atomic writes (text, JSON and PNG figures)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from ml_collections import ConfigDict


def load_config_file(path: str | Path, arg: str | None = None) -> ConfigDict:
    """`get_config(arg)` of an ml_collections config file, as `--config=path[:arg]` would load it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def read_rows(path: str | Path, required: Sequence[str] = (), what: str = "file") -> list[dict]:
    """The rows of a JSON list or a JSON Lines file; each must be an object holding the `required` keys as strings.

    A `.json` file of several JSON values is read as JSON Lines, as the hub's exports often are.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    rows = None if path.suffix == ".jsonl" or not text.strip() else _json_or_lines(text, f"{what} {path}")
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{what} {path} is not JSON Lines: line {n} does not parse ({e.msg})") from None
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


def _json_or_lines(text: str, name: str) -> list | None:
    """A JSON list, or None when the text is several JSON values (JSON Lines under another name)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return None
        raise ValueError(f"{name} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{name}: expected a list of rows or JSON Lines, found {type(rows).__name__}")
    return rows


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


def figure(figsize: tuple[float, float]):
    """A matplotlib (figure, axes) pair drawn off-screen: reports are written on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path: str | Path) -> Path:
    """The figure as a PNG, written atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def atomic_dir(out: Path):
    """Context manager: yields a temporary sibling folder, renamed onto `out` only on success."""
    return _AtomicDir(Path(out))


class _AtomicDir:
    def __init__(self, out: Path):
        self.out = out.absolute()

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the final folder
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return False


def remove_stale_tmp(out: str | Path) -> None:
    """Remove the temporary siblings a killed `atomic_dir(out)` left behind. Only for a caller that holds
    the folder's lock (runlock): another live writer's temporary folder would look the same."""
    out = Path(out)
    for p in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(p, ignore_errors=True)
