"""The refusal benchmarks Response Tuning evaluates on, read from the shipped files as its code reads them.

Each item is a dict {benchmark, subset, id, prompt, label, category}: `label` is the query's nature
(`unsafe` for every harmful-request benchmark, XSTest's own `safe`/`unsafe`), `subset` HarmBench's
`standard`/`contextual`, `category` HarmBench's SemanticCategory or XSTest's type. Response Tuning reads
HarmBench, MaliciousInstruct and XSTest from walledai's hub copies; here they are the upstream files those
copies come from (data/README.md), so row counts match but the hub bytes were not compared.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from jax_implicit import datasets

BENCHMARKS = ("advbench", "harmbench", "malicious_instruct", "xstest")  # dataset names (data/README.md)
HARMBENCH_SUBSETS = ("standard", "contextual")  # copyright behaviours are not refusal tests
QUOTES = "\"'"


def _csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"benchmark file {path}: missing column {missing[0]!r} (has {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"benchmark file {path} has no rows")
    return rows


def _item(benchmark: str, i, prompt: str, label: str = "unsafe", subset: str = "", category: str = "") -> dict:
    return dict(benchmark=benchmark, subset=subset, id=str(i), prompt=prompt, label=label, category=category)


def advbench_goal(goal: str) -> str:
    """Response Tuning's cleaning: strip whitespace, then one leading and one trailing quote, then whitespace."""
    goal = goal.strip()
    goal = goal[1:] if goal[:1] and goal[0] in QUOTES else goal
    goal = goal[:-1] if goal[-1:] and goal[-1] in QUOTES else goal
    return goal.strip()


def _advbench(path: Path) -> list[dict]:
    return [_item("advbench", i, advbench_goal(r["goal"])) for i, r in enumerate(_csv(path, ("goal",)))]


def _harmbench(path: Path) -> list[dict]:
    """Standard behaviours as they are; a contextual one is its context, a rule line, then the behaviour."""
    rows = _csv(path, ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"))
    out = []
    for r in rows:
        subset = r["FunctionalCategory"]
        if subset in HARMBENCH_SUBSETS:
            prompt = r["Behavior"] if subset == "standard" else r["ContextString"] + "\n\n---\n\n" + r["Behavior"]
            out.append(_item("harmbench", r["BehaviorID"], prompt, subset=subset, category=r["SemanticCategory"]))
    return out


def _malicious_instruct(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_item("malicious_instruct", i, line) for i, line in enumerate(lines)]


def _xstest(path: Path) -> list[dict]:
    rows = _csv(path, ("id", "prompt", "type", "label"))
    for i, r in enumerate(rows):
        if r["label"] not in ("safe", "unsafe"):
            raise ValueError(f"benchmark file {path}, row {i}: label {r['label']!r} is neither 'safe' nor 'unsafe'")
    return [_item("xstest", r["id"], r["prompt"], label=r["label"], category=r["type"]) for r in rows]


READERS = {"advbench": _advbench, "harmbench": _harmbench, "malicious_instruct": _malicious_instruct,
           "xstest": _xstest}


def check_names(names) -> None:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; expected some of {BENCHMARKS}" if unknown
                         else f"no benchmarks chosen; expected some of {BENCHMARKS}")


def path(name: str, override: str = "") -> Path:
    """The benchmark's file: `override` if given, else the shipped one."""
    return Path(override) if override else datasets.path(name)


def sample(items: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """Response Tuning's `--max_num_examples`: a seeded `random.sample` of positions, kept in file order."""
    if not limit or limit >= len(items):
        return items
    return [items[k] for k in sorted(random.Random(seed).sample(range(len(items)), limit))]


def load(name: str, override: str = "", limit: int = 0) -> list[dict]:
    """The items of one benchmark; `limit` samples that many of each HarmBench subset, of the others in all."""
    check_names([name])
    items = READERS[name](path(name, override))
    if name != "harmbench":
        return sample(items, limit)
    return [x for s in HARMBENCH_SUBSETS for x in sample([x for x in items if x["subset"] == s], limit)]
