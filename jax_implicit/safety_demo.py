"""`make safety-demo`: does response tuning keep or teach refusals, on a real base model, offline?

Four models answer the same seeded slices of AdvBench, HarmBench (standard and contextual),
MaliciousInstruct and XSTest: Gemma-3-270M base, the base times the paper's three rules, the base after a
short response-tuning run on LIMA responses, and after the same run with Response Tuning's contextual
refusals appended (response-only, as that paper trains them). Every stage is the project's own command
(`train.run`, `evaluate.safety.run`); the report folder holds summary.md, results.json and each model's
bar chart.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ml_collections import ConfigDict

from jax_implicit import demo, files, pretrained

VARIANTS = ("base", "base+rules", "response-tuned", "response-tuned+refusals")


def _evaluate(cfg: ConfigDict, model_dir: Path, use_rules: bool, name: str) -> dict:
    from jax_implicit.evaluate import safety

    s = demo._load_config("configs/eval/safety.py")
    s.model.update(path=str(model_dir), param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    s.update(use_rules=use_rules, name=name, limit=cfg.limit, prefixes=cfg.prefixes,
             out=str(Path(cfg.work) / "safety" / name))
    s.decode.update(max_new_tokens=cfg.max_new_tokens)
    s.judge.update(cfg.judge)
    return safety.run(s)


def _tune(cfg: ConfigDict, model_dir: Path, lima: str, mix: ConfigDict | None, name: str) -> dict:
    """`demo._tune`'s run, summarised: its train state is let go, so two runs never hold memory at once."""
    r = demo._tune(cfg, model_dir, lima, mix, name)
    return dict(hf_dir=str(r.hf_dir), examples=r.examples, steps=r.steps, final_loss=r.final_loss)


def _behaviour(cfg: ConfigDict, name: str) -> str:
    """One model's row: how often its replies echo the prompt (`demo_report.echoes_prompt`), their mean length,
    and its first AdvBench reply."""
    from jax_implicit.demo_report import echoes_prompt

    rows = json.loads((Path(cfg.work) / "safety" / name / "responses.json").read_text())
    echo = sum(echoes_prompt(r["prompt"], r["response"]) for r in rows) / len(rows)
    words = sum(len(r["response"].split()) for r in rows) / len(rows)
    first = next((r["response"] for r in rows if r["benchmark"] == "advbench"), "")
    first = " ".join(first.split())[:100].replace("|", "\\|")
    return f"| {name} | {100 * echo:.0f}% | {words:.1f} | {first} |"


def summary(results: dict[str, dict], cfg: ConfigDict, tuning: dict, data_note: str, seconds: dict,
            total: float) -> str:
    from jax_implicit.evaluate import safety

    first = next(iter(results.values()))
    lines = [
        "# Safety demo: refusal rates of Gemma-3-270M before and after response tuning", "",
        f"Data: {data_note}. Items: a seed-0 sample of {cfg.limit} per benchmark (per HarmBench subset), "
        f"{first['n']} prompts per model, greedy, at most {cfg.max_new_tokens} new tokens.",
        f"Classifier: GCG's refusal-prefix list `{cfg.prefixes}` (a reply is a refusal when one of its strings "
        "occurs in it)" + ("" if cfg.judge.kind == "none" else f"; judge: {first['judge']}") + ".",
        f"Tuning: {tuning['response-tuned']['examples']} LIMA responses, and the same plus "
        f"{cfg.refusals.n} contextual refusals ({tuning['response-tuned+refusals']['examples']} examples); "
        f"{cfg.tune.epochs} epoch(s) of {cfg.tune.global_batch}-example batches at lr {cfg.tune.lr}.", "",
        "Percent of items: defense success (refused) per benchmark; for XSTest also the safe prompts complied "
        "with, F1 of refusing the unsafe ones, and the fraction handled right.", "",
        safety.table(results), "",
        "A reply counts as complying whenever no refusal string occurs in it, so a base model that only repeats "
        "the request counts as complying; how often each model does that, and one AdvBench reply each:", "",
        "| model | echoes the prompt | mean words | first AdvBench reply |", "|---|---:|---:|---|",
        *[_behaviour(cfg, name) for name in results], "",
        "| stage | seconds |", "|---|---:|", *[f"| {k} | {v:.0f} |" for k, v in seconds.items()],
        f"| total | {total:.0f} |"]
    return "\n".join(lines) + "\n"


def run(cfg: ConfigDict) -> Path:
    start = time.perf_counter()
    sources, data_note = demo.data_sources(cfg)
    mix = ConfigDict(cfg.refusals.to_dict())
    stages = demo.Stages(total=7)
    model_dir = stages("model: convert the real weights into checkpoints/", pretrained.model_dir, cfg.model.path)
    results = {"base": stages("refusal evaluation (base)", _evaluate, cfg, model_dir, False, "base"),
               "base+rules": stages("refusal evaluation (base x three rules)", _evaluate, cfg, model_dir, True,
                                    "base+rules")}
    tuning = {"response-tuned": stages("response tuning (LIMA responses)", _tune, cfg, model_dir, sources["lima"],
                                       None, "tune"),
              "response-tuned+refusals": stages("response tuning (LIMA responses + contextual refusals)", _tune, cfg,
                                                model_dir, sources["lima"], mix, "tune_refusals")}
    for name, t in tuning.items():
        results[name] = stages(f"refusal evaluation ({name})", _evaluate, cfg, Path(t["hf_dir"]), False, name)
    total = time.perf_counter() - start
    with files.atomic_dir(Path(cfg.report)) as tmp:
        for name in VARIANTS:
            shutil.copy(Path(cfg.work) / "safety" / name / "refusal_rates.png", tmp / f"refusal_rates_{name}.png")
        files.write_json(tmp / "results.json", dict(models=results, tuning=tuning, stage_seconds=stages.times,
                                                 total_seconds=total, config=cfg.to_dict()))
        files.write_atomic(tmp / "summary.md", summary(results, cfg, tuning, data_note, stages.times, total))
    print((Path(cfg.report) / "summary.md").read_text())
    return Path(cfg.report)


if __name__ == "__main__":
    from absl import logging

    from jax_implicit import cli

    logging.set_verbosity(logging.WARNING)
    cli.main(run, "configs/safety_demo.py")
