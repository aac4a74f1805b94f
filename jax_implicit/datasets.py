"""Where every dataset comes from: one table of named datasets and one resolver.

A dataset is named by what it is (`lima`, `val`, `alpaca_eval`, `advbench`, ...) and by default is
its file in the repository's `data/` folder, copied unchanged from its public source (data/README.md
gives source, rows and license of each), so a fresh clone works offline. Every command resolves its
data through `resolve`, which also takes a user's own file or folder, or a hub dataset id
(`owner/name[:config][@split]`) for users with network. A hub id that cannot be reached is a one-line
error naming the dataset and the flag that points at a local file, raised before any model work.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

DATA_ENV = "JAX_IMPLICIT_DATA"  # a folder laid out like data/, read instead of it
REPO_DATA = Path(__file__).resolve().parents[1] / "data"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")  # a spec ending so is a file, never a hub id
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.-]+)?$")


class DataSourceError(ValueError):
    """A dataset name, path or hub id that cannot be read here."""


@dataclasses.dataclass(frozen=True)
class Entry:
    file: str  # under the data folder; "" when only a hub copy exists
    rows: int | None  # rows in that file, as data/README.md counts them
    hub: str = ""  # the public hub id of the same data: owner/name[:config][@split]


CATALOG: dict[str, Entry] = {
    "lima": Entry("lima/lima_data.jsonl", 1030, "GAIR/lima"),
    "lima_response": Entry("lima/lima_no_instruction.jsonl", 1030),
    "lima_rephrased": Entry("lima/lima_rephrased.jsonl", 1029),
    "refusal_selective": Entry("refusal/refusal_selective.jsonl", 29),
    "lima_response_refusal": Entry("refusal/lima_no_instruction_plus_refusal.jsonl", 1059),
    "val": Entry("val_eval/val.jsonl", 56),
    "val_references": Entry("val_eval/val-gpt3.5-2.json", 56),
    "alpaca_eval": Entry("alpaca_eval/alpaca_eval.json", 805, "tatsu-lab/alpaca_eval:alpaca_eval@eval"),
    "gsm8k": Entry("gsm8k/train.jsonl", 7473, "openai/gsm8k:main"),
    "dolly": Entry("dolly/dolly_train.json", 2000, "databricks/databricks-dolly-15k"),
    "advbench": Entry("safety/advbench/harmful_behaviors.csv", 520),
    "harmbench": Entry("safety/harmbench/harmbench_behaviors_text_all.csv", 400),
    "harmbench_test": Entry("safety/harmbench/harmbench_behaviors_text_test.csv", 320),
    "malicious_instruct": Entry("safety/malicious_instruct/MaliciousInstruct.txt", 100),
    "xstest": Entry("safety/xstest/xstest_prompts.csv", 450),
    "safety_tuned_llamas": Entry("safety/safety_tuned_llamas/safety_only_data_Instructions.json", 2483),
    "refusal_prefixes": Entry("safety/refusal_prefixes.json", 4),
    # Hub only: the paper's other tuning sets (the repository ships no copy).
    "alpaca": Entry("", None, "tatsu-lab/alpaca"),
    "mbpp": Entry("", None, "google-research-datasets/mbpp"),
    "poetry": Entry("", None, "merve/poetry"),
    "recipes": Entry("", None, "Hieu-Pham/kaggle_food_recipes"),
    "chess": Entry("", None, "patrickfrank1/chess-pgn-games"),
}
LLAMA2_TOKENIZER = "tokenizers/llama2"  # under the data folder


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved dataset: a local `path`, or a hub id with its config and split."""

    spec: str
    path: Path | None = None
    hub_id: str = ""
    hub_config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return str(self.path) if self.path else self.hub_id + (f":{self.hub_config}" if self.hub_config else "")


def root() -> tuple[Path, str]:
    """The data folder and how it was chosen: $JAX_IMPLICIT_DATA if set, else the repository's data/."""
    if value := os.environ.get(DATA_ENV, ""):
        if not Path(value).is_dir():
            raise DataSourceError(f"data folder {value} (from ${DATA_ENV}) does not exist")
        return Path(value), f"from ${DATA_ENV}"
    return REPO_DATA, "the repository's data/ folder"


def path(name: str) -> Path:
    """The local file of a named dataset."""
    entry = CATALOG.get(name)
    if entry is None or not entry.file:
        local = sorted(n for n, e in CATALOG.items() if e.file)
        raise DataSourceError(f"no local file for dataset {name!r}; local datasets: {', '.join(local)}")
    folder, how = root()
    file = folder / entry.file
    if not file.is_file():
        raise DataSourceError(f"dataset {name!r}: {file} is missing from the data folder ({how})")
    return file


def resolve(spec: str, *, flag: str = "the data path setting") -> Source:
    """A dataset name, a local file or folder, or a hub id, as a `Source`.

    `flag` names the setting that points at a local file; it goes into the error a user sees offline.
    """
    if not spec:
        raise DataSourceError(f"no dataset given; set {flag} to a dataset name ({', '.join(CATALOG)}), a file or a hub id")
    entry = CATALOG.get(spec)
    if entry is not None:
        return Source(spec, path=path(spec)) if entry.file else hub(spec, entry.hub, flag)
    if Path(spec).exists():
        return Source(spec, path=Path(spec))
    if Path(spec).suffix.lower() in FILE_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DataSourceError(f"{flag}: data file {spec} does not exist")
    if HUB_ID.match(spec):
        return hub(spec, spec, flag)
    raise DataSourceError(f"{flag}={spec!r} is not a dataset name ({', '.join(CATALOG)}), an existing file or "
                          f"folder, or a hub id (owner/name[:config][@split])")


def hub(name: str, hub_spec: str, flag: str) -> Source:
    """The hub dataset `hub_spec` (owner/name[:config][@split]), checked to be reachable."""
    rest, _, split = hub_spec.partition("@")
    hub_id, _, config = rest.partition(":")
    why = _unreachable()
    if why:
        raise DataSourceError(f"dataset {name!r} needs the hub id {hub_id!r}, which cannot be reached ({why}); "
                              f"set {flag} to a local file instead")
    return Source(name, hub_id=hub_id, hub_config=config or None, split=split or "train")


def _unreachable() -> str:
    """Why the hub cannot be reached, or "" when a connection opens."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or e}"
    return ""


def hub_rows(source: Source) -> list[dict]:
    """The rows of a hub dataset, through `datasets` (online)."""
    import datasets

    return [dict(r) for r in datasets.load_dataset(source.hub_id, source.hub_config, split=source.split)]
