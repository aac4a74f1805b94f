"""The paper's tables from a results folder (see `layout`): mean ± standard deviation over seeds,
rows of tuning methods, columns of base models, missing cells marked.

    python -m jax_implicit.evaluate.tables --config=configs/eval/tables.py --config.results=results
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jax_implicit import files
from jax_implicit.evaluate import layout

MISSING = "–"
RAW = "†"


def seed_results(results: Path, base: str, method: str, file: str) -> list[dict]:
    """Every seed's JSON result for one cell, in seed order."""
    folder = results / base / method
    seeds = sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    return [json.loads((s / file).read_text()) for s in seeds if (s / file).is_file()]


def why_missing(results: Path, base: str, method: str, file: str) -> str:
    """Why a cell is empty: the first missing part of results/<base>/<method>/seed<N>/<file>, with what is there."""
    folder = results / base / method
    seeds = sorted(folder.glob("seed*"))
    parts = [base, method] + ([seeds[0].name, *Path(file).parts] if seeds else ["seed<N>"])
    at = results
    for part in parts:
        if not (at / part).exists():
            there = sorted(p.name for p in at.iterdir()) if at.is_dir() else []
            return f"no {at / part} (there: {', '.join(there[:8]) + (' ...' if len(there) > 8 else '') or 'nothing'})"
        at = at / part
    return f"{at} is unreadable"


def aggregate(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def cell(rows: list[dict], kind: str, seeds: int) -> tuple[str, set[str]]:
    """The formatted cell and its footnote markers."""
    if not rows:
        return MISSING, {MISSING}
    notes = set()
    if kind == "ranking":
        values = [100 * r["fraction"] for r in rows]
    elif all(r.get("length_controlled_winrate") is not None for r in rows):
        values = [r["length_controlled_winrate"] for r in rows]
    else:
        values, notes = [r["win_rate"] for r in rows], {RAW}
    return formatted(values, seeds, notes)


def formatted(values: list[float], seeds: int, notes: set[str] = frozenset()) -> tuple[str, set[str]]:
    """Mean ± std over seeds, saying when fewer seeds than expected are in; MISSING when none is."""
    if not values:
        return MISSING, {MISSING}
    notes = set(notes)
    mean, std = aggregate(values)
    text = f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"
    if len(values) < seeds:
        text += f" ({len(values)}/{seeds} seeds)"
    return text + "".join(sorted(notes)), notes


def table(cfg, spec) -> tuple[str, set[str], dict]:
    """One markdown table, the footnote markers it used, and what its cells read: judges, references, the
    number of result files, and why empty cells are empty."""
    results = Path(cfg.results)
    file = layout.RANKING if spec.kind == "ranking" else str(Path(cfg.eval_set) / cfg.judge / layout.RESULT)
    lines = ["", "", "| | " + " | ".join(label for label, _ in cfg.columns) + " |", "|---|" + "---|" * len(cfg.columns)]
    notes, read = set(), dict(judges=set(), references=set(), files=0, missing=[])
    for row_label, method in spec.rows:
        cells = []
        for _, base in cfg.columns:
            rows = seed_results(results, base, method, file)
            text, marks = cell(rows, spec.kind, cfg.seeds)
            cells.append(text)
            notes |= marks
            read["files"] += len(rows)
            read["judges"] |= {r["judge"] for r in rows if "judge" in r}
            read["references"] |= {r["reference"] for r in rows if "reference" in r}
            if not rows:
                read["missing"].append(why_missing(results, base, method, file))
        lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
    lines[0] = f"### {spec.title}" + (f" (win rate vs {_names(read['references'])})" if spec.kind != "ranking" else "")
    return "\n".join(lines), notes, read


def _names(references: set[str]) -> str:
    return ", ".join(f"`{r}`" for r in sorted(references)) or "the reference named in each result.json"


def safety_table(cfg, spec) -> tuple[str, set[str], dict]:
    """Refusal evaluation of one base model (`spec.base`): rows of methods, a column per headline rate (%)."""
    file = str(Path(layout.SAFETY) / layout.RESULT)
    lines = [f"### {spec.title}", "", "| | " + " | ".join(spec.columns) + " |", "|---|" + "---|" * len(spec.columns)]
    notes, read = set(), dict(judges=set(), references=set(), files=0, missing=[])
    for row_label, method in spec.rows:
        rows = [r for r in seed_results(Path(cfg.results), spec.base, method, file) if spec.classifier in r["headline"]]
        read["files"] += len(rows)
        if not rows:
            read["missing"].append(why_missing(Path(cfg.results), spec.base, method, file))
        cells = []
        for column in spec.columns:
            text, marks = formatted([100 * r["headline"][spec.classifier][column] for r in rows
                                     if column in r["headline"][spec.classifier]], cfg.seeds)
            cells.append(text)
            notes |= marks
        read["judges"] |= {r["judge"] for r in rows if spec.classifier == "judge" and r.get("judge")}
        lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), notes, read


KINDS = {"head_to_head": table, "ranking": table, "safety": safety_table}


def report(cfg) -> str:
    for name, spec in cfg.tables.items():
        if spec.kind not in KINDS:
            raise ValueError(f"tables.{name}.kind={spec.kind!r}; expected one of {sorted(KINDS)}")
    if not Path(cfg.results).is_dir():
        raise FileNotFoundError(f"results folder {cfg.results} does not exist")
    parts, notes, read = [], set(), dict(judges=set(), references=set(), files=0, missing=[])
    for _, spec in cfg.tables.items():
        text, marks, used = KINDS[spec.kind](cfg, spec)
        parts.append(text)
        notes |= marks
        read = {k: read[k] + v if isinstance(v, (int, list)) else read[k] | v for k, v in used.items()}
    kinds = {spec.kind for spec in cfg.tables.values()}
    foot = [f"Head-to-head cells: {cfg.eval_set} length-controlled win rate (%) against {_names(read['references'])} "
            f"(raw where marked {RAW}), mean ± standard deviation over seeds; judge folder `{cfg.judge}`."
            ] if "head_to_head" in kinds else []
    foot += [f"Refusal cells: % of the benchmark's items (Response Tuning's metrics: refused for AdvBench, HarmBench "
             "and MaliciousInstruct; XSTest as named), classifier as the title says, mean ± standard deviation "
             "over seeds."] if "safety" in kinds else []
    foot += [f"Judge: {j}." for j in sorted(read["judges"])]
    if RAW in notes:
        foot.append(f"{RAW} raw win rate: the length-controlled one is missing for at least one seed "
                    "(its result.json says why).")
    if MISSING in notes:
        reasons = sorted(set(read["missing"]))
        foot.append(f"{MISSING} no results for this cell under {cfg.results}/<base>/<method>/seed*/: "
                    + "; ".join(reasons[:12]) + (f"; and {len(reasons) - 12} more" if len(reasons) > 12 else "") + ".")
    foot.append(f"Read {read['files']} result files under {cfg.results}.")
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {f}" for f in foot) + "\n"


def run(cfg) -> str:
    text = report(cfg)
    out = files.write_atomic(Path(cfg.out or Path(cfg.results) / cfg.file), text)
    return f"{text}\nwrote {out}"


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(run, "configs/eval/tables.py")
