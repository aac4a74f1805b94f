"""The demo's report folder: summary.md, side_by_side.md, results.json and PNG plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jax_implicit import files, prompts

FILES = ("summary.md", "side_by_side.md", "results.json", "loss.png", "win_rates.png", "ranking.png")


def _bar_png(path: Path, labels: list[str], values: list[float], ylabel: str, title: str, ref: float | None) -> None:
    fig, ax = files.figure((5.5, 3.5))
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868"][:len(values)])
    ax.bar_label(bars, fmt="%.1f" if max(values, default=0) > 1 else "%.2f")
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    files.save_figure(fig, path)


def echoes_prompt(instruction: str, output: str) -> bool:
    """The base-model habit the paper starts from: continuing the prompt (restating the instruction, or
    writing the next chat tag) instead of answering it. A judge-free signal next to the small judge."""
    return instruction.strip()[:40] in output or any(tag in output for tag in prompts.tags("user_assistant"))


def _answers(path: Path) -> tuple[list[dict], float, float]:
    """The rows of an outputs file, their mean length in words and the fraction that echo the prompt."""
    rows = json.loads(Path(path).read_text())
    words = sum(len(r["output"].split()) for r in rows) / len(rows)
    return rows, words, sum(echoes_prompt(r["instruction"], r["output"]) for r in rows) / len(rows)


def write(out: Path, *, cfg, data_note: str, model_dir: Path, outputs: dict[str, Path], tuned, ranks: dict,
          judged: dict, export_diff: float, stage_seconds: dict[str, float], total_seconds: float) -> dict:
    """Write the report folder atomically; returns the results it shows."""
    rows, words, echoes = {}, {}, {}
    for name, path in outputs.items():
        rows[name], words[name], echoes[name] = _answers(path)
    judge_label = next(iter(judged.values()))["judge"]
    lc_note = next(iter(judged.values()))["lc_missing_reason"]
    results = dict(
        model=str(model_dir), data=data_note, judge=judge_label, total_seconds=round(total_seconds, 1),
        stage_seconds={k: round(v, 1) for k, v in stage_seconds.items()},
        variants={name: dict(mean_words=round(words[name], 1), echoes_prompt=round(echoes[name], 3),
                             win_rate_vs_base=judged[name]["win_rate"] if name in judged else None,
                             n_judged=judged[name]["n"] if name in judged else None,
                             ranking=ranks[name]["fraction"] if name in ranks else None)
                  for name in outputs},
        tuning=dict(examples=tuned.examples, steps=tuned.steps, final_loss=tuned.final_loss, hf_export=str(tuned.hf_dir)),
        export_max_abs_logit_diff=export_diff, length_controlled=lc_note,
    )
    with files.atomic_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        shutil.copy(tuned.plot, tmp / "loss.png")
        judged_names = list(judged)
        _bar_png(tmp / "win_rates.png", judged_names, [judged[n]["win_rate"] for n in judged_names],
                 "win rate vs base (%)", f"head-to-head, {judge_label}", ref=50.0)
        rank_names = list(ranks)
        _bar_png(tmp / "ranking.png", rank_names, [ranks[n]["fraction"] for n in rank_names],
                 "P(real response scores higher)", "response-ranking capability", ref=0.5)
        (tmp / "summary.md").write_text(_summary(cfg, results))
        (tmp / "side_by_side.md").write_text(_side_by_side(rows, cfg.side_by_side))
    return results


def terminal_table(results: dict) -> str:
    lines = [f"\n{'variant':<16}{'mean words':>12}{'echoes prompt':>15}{'win rate vs base':>18}{'ranking':>10}"]
    for name, v in results["variants"].items():
        win = "-" if v["win_rate_vs_base"] is None else f"{v['win_rate_vs_base']:.1f}%"
        rank = "-" if v["ranking"] is None else f"{v['ranking']:.3f}"
        lines.append(f"{name:<16}{v['mean_words']:>12.1f}{v['echoes_prompt']:>15.0%}{win:>18}{rank:>10}")
    lines += [f"judge: {results['judge']}",
              f"tuning: {results['tuning']['steps']} steps on {results['tuning']['examples']} examples, "
              f"final loss {results['tuning']['final_loss']:.3f}; export reload max |dlogit| "
              f"{results['export_max_abs_logit_diff']:.2e}",
              f"total wall time {results['total_seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def _summary(cfg, r: dict) -> str:
    table = ["| variant | mean words | echoes the prompt | win rate vs base | response ranking |",
             "|---|---:|---:|---:|---:|"]
    for name, v in r["variants"].items():
        win = "–" if v["win_rate_vs_base"] is None else f"{v['win_rate_vs_base']:.1f}% (n={v['n_judged']})"
        rank = "–" if v["ranking"] is None else f"{v['ranking']:.3f}"
        table.append(f"| {name} | {v['mean_words']:.1f} | {v['echoes_prompt']:.0%} | {win} | {rank} |")
    stages = "\n".join(f"| {k} | {v:.0f} s |" for k, v in r["stage_seconds"].items())
    t = r["tuning"]
    return f"""# jax_implicit demo

Model: `{r['model']}`. Data: {r['data']}.

## Results

{chr(10).join(table)}

- Greedy answers to {cfg.instructions} of the paper's validation instructions, at most {cfg.max_new_tokens} new
  tokens each (answers that run longer are cut there).
- Echoes the prompt: answers that restate their instruction (its first 40 characters) or write a
  chat tag, i.e. continue the prompt instead of answering it; no judge involved.
- Head-to-head judge: **{r['judge']}**, on {cfg.judged} validation instructions, each pair in both
  orders. A small local model judges: these win rates cannot be set beside the paper's GPT-4 ones.
- Length-controlled win rate: {r['length_controlled'] or 'computed by alpaca_eval'}.
- Response ranking: fraction of (real - random) score differences above 0, the first {cfg.ranking.examples}
  examples without an input passage x {cfg.ranking.k} random responses (seed {cfg.ranking.seed}); 0.5 is chance.
- Response tuning: {t['examples']} LIMA responses with the instruction replaced by the empty string,
  {t['steps']} optimizer steps, final loss {t['final_loss']:.3f}; exported to `{t['hf_export']}` and
  reloaded with transformers: max |logit difference| {r['export_max_abs_logit_diff']:.2e}.

![loss](loss.png) ![win rates](win_rates.png) ![ranking](ranking.png)

## Wall time (total {r['total_seconds'] / 60:.1f} min)

| stage | time |
|---|---:|
{stages}

Outputs for a few instructions side by side: [side_by_side.md](side_by_side.md).
"""


def _side_by_side(rows: dict[str, list[dict]], n: int) -> str:
    names = list(rows)
    parts = ["# Outputs side by side\n"]
    for i, row in enumerate(rows[names[0]][:n]):
        parts.append(f"## {i + 1}. {row['instruction'].strip()}\n")
        for name in names:
            text = rows[name][i]["output"].strip() or "(empty)"
            parts.append(f"**{name}**\n\n" + "\n".join("> " + line for line in text.splitlines()) + "\n")
    return "\n".join(parts)
