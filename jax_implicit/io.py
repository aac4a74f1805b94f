"""Where data comes from and how files are written: the local data folder, config files, atomic writes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ml_collections import ConfigDict

DATA_ENV = "JAX_IMPLICIT_DATA"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside a checkout


def data_folder(flag: str = "") -> tuple[Path | None, str]:
    """The local data folder to read instead of public dataset ids, and how it was chosen.

    Order: an explicit flag, then $JAX_IMPLICIT_DATA, then ../shared/data beside the checkout; None
    means "use the public ids" (online). A folder that was asked for but does not exist is an error.
    """
    for value, how in ((flag, "given by flag"), (os.environ.get(DATA_ENV, ""), f"from ${DATA_ENV}")):
        if value:
            if not Path(value).is_dir():
                raise FileNotFoundError(f"data folder {value} ({how}) does not exist")
            return Path(value), how
    if SHARED_DATA.is_dir():
        return SHARED_DATA, "../shared/data beside the project"
    return None, "no local data folder"


def load_config_file(path: str | Path, arg: str | None = None) -> ConfigDict:
    """`get_config(arg)` of an ml_collections config file, as `--config=path[:arg]` would load it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary sibling, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
