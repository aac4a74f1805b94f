"""The results folder that evaluation commands write and the table report reads.

    <results>/<base>/<method>/seed<N>/
        <eval_set>/<judge>/result.json    head-to-head summary (alpaca.py), next to alpaca_eval's own
                                          leaderboard.csv, annotations.json and the judge's config
        ranking.json                      response-ranking capability (ranking.py)
        safety/result.json                refusal evaluation (safety.py), with responses.json, table.md and
                                          refusal_rates.png

`base` names the base model (e.g. `llama2-7b`, `olmo-7b`, `smollm2-135m`), `method` the decoding
variant of the untrained model (`base`, `rules`, `rules_no_eos`, ...: `rules_method`) or a tuned
model with its epochs (`instruction_10ep`, `response_10ep`, `single_task_gsm8k_10ep`: `method`), `eval_set` is `alpaca_eval` (805 instructions) or `val` (the paper's 56), and `judge` is
`weighted_alpaca_eval_gpt4_turbo` or `local-<judge model folder>`. Training sweeps only need to
pass `--config.run.base/method/seed` to the evaluation commands for their results to land here.
"""

from __future__ import annotations

from pathlib import Path

RESULT = "result.json"
RANKING = "ranking.json"
SAFETY = "safety"
LIMA_TASKS = ("instruction", "response")


def method(task: str, epochs: int | None = None) -> str:
    """The results folder of a tuning task (`response_10ep`, `single_task_gsm8k_10ep`) or a decoding variant."""
    name = task if task in LIMA_TASKS else f"single_task_{task}"
    return name if epochs is None else f"{name}_{epochs}ep"


def rules_method(variant: str) -> str:
    """configs/generate.py's variants as results folders: "" -> rules, no_eos -> rules_no_eos, no_rules -> base."""
    return {"": "rules", "no_rules": "base"}.get(variant, f"rules_{variant}")


def seed_dir(results: str | Path, base: str, method: str, seed: int) -> Path:
    for name, value in (("base", base), ("method", method)):
        if not value or "/" in value or value in (".", ".."):  # ".." would write outside the results folder
            raise ValueError(f"run.{name}={value!r}: give a non-empty folder name (or an explicit out path)")
    return Path(results) / base / method / f"seed{seed}"


def out_path(cfg, *parts: str) -> Path:
    """`cfg.out` if set, else the run's seed folder joined with `parts`."""
    if cfg.out:
        return Path(cfg.out)
    return seed_dir(cfg.run.results, cfg.run.base, cfg.run.method, cfg.run.seed).joinpath(*parts)
