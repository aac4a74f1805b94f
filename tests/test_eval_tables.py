"""The tables report: the paper's layout from a folder of fake seed results written here."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs.eval import tables as tables_config
from jax_implicit.evaluate import layout, tables

GPT4 = "weighted_alpaca_eval_gpt4_turbo"
LC = {"llama2-7b": [43.1, 41.9, 45.0, 44.2, 42.3]}
RAW = {"olmo-7b": [38.0, 40.5, 36.1]}
RANK = {"llama2-7b": [0.91, 0.93], "olmo-7b": [0.88, 0.90]}


def write_results(root):
    for base, values in LC.items():
        for seed, v in enumerate(values, start=1):
            path = layout.seed_dir(root, base, "response_10ep", seed) / "alpaca_eval" / GPT4 / layout.RESULT
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"win_rate": v - 5, "length_controlled_winrate": v, "judge": "GPT-4 (x)",
                                        "reference": "llama2-7b-instruction_10ep"}))
    for base, values in RAW.items():
        for seed, v in enumerate(values, start=1):
            path = layout.seed_dir(root, base, "response_10ep", seed) / "alpaca_eval" / GPT4 / layout.RESULT
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"win_rate": v, "length_controlled_winrate": None, "judge": "GPT-4 (x)",
                                        "lc_missing_reason": "offline"}))
    for base, values in RANK.items():
        for seed, v in enumerate(values, start=1):
            path = layout.seed_dir(root, base, "instruction_10ep", seed) / layout.RANKING
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fraction": v}))
    # a result of another judge must not leak into the GPT-4 tables
    other = layout.seed_dir(root, "llama2-7b", "base", 1) / "alpaca_eval" / "local-smollm2" / layout.RESULT
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"win_rate": 3.0, "length_controlled_winrate": None, "judge": "local"}))


def row(text: str, table: str, label: str) -> list[str]:
    block = text.split(f"### {table}")[1].split("###")[0]
    line = next(line for line in block.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_tables_layout_mean_std_and_missing(tmp_path):
    write_results(tmp_path)
    cfg = tables_config.get_config()
    cfg.results = str(tmp_path)
    shown = tables.run(cfg)
    text = (tmp_path / "tables.md").read_text()
    assert shown == f"{text}\nwrote {tmp_path / 'tables.md'}"
    # every table, its header of base models, and its method rows in the paper's order
    for spec in cfg.tables.values():
        assert f"### {spec.title}" in text and "\n\n| | Llama-2-7B | OLMo-7B |\n|---|---|---|\n" in text
        block = text.split(f"### {spec.title}")[1].split("###")[0]
        labels = [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("| ") and "---" not in line]
        assert labels[1:] == [label for label, _ in spec.rows]
    lc = np.array(LC["llama2-7b"])
    raw = np.array(RAW["olmo-7b"])
    t1 = cfg.tables.table1.title
    assert row(text, t1, "Response tuning") == [f"{lc.mean():.1f} ± {lc.std(ddof=1):.1f}",
                                                f"{raw.mean():.1f} ± {raw.std(ddof=1):.1f} (3/5 seeds)†"]
    assert row(text, t1, "Base model") == ["–", "–"]
    rank = np.array(RANK["olmo-7b"]) * 100
    assert row(text, cfg.tables.table2.title, "Instruction tuning")[1] == (
        f"{rank.mean():.1f} ± {rank.std(ddof=1):.1f} (2/5 seeds)")
    assert row(text, cfg.tables.table3.title, "Chess") == ["–", "–"]
    assert "† raw win rate" in text and "– no results" in text and "Judge: GPT-4 (x)." in text
    # the footnotes name the real reference, what was read, and why cells are empty
    assert f"### {t1} (win rate vs `llama2-7b-instruction_10ep`)" in text
    assert "against `llama2-7b-instruction_10ep`" in text and "Read 12 result files" in text
    assert f"no {tmp_path}/llama2-7b/rules (there: base, instruction_10ep, response_10ep)" in text
    assert f"no {tmp_path}/llama2-7b/base/seed1/alpaca_eval/{GPT4} (there: local-smollm2)" in text


def test_tables_command_line(tmp_path):
    write_results(tmp_path)
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "jax_implicit.evaluate.tables", "--config=configs/eval/tables.py",
                           f"--config.results={tmp_path}", f"--config.out={out}", "--config.seeds=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() in proc.stdout and "(2/5 seeds)" not in out.read_text()


def test_tables_missing_results_folder(tmp_path):
    cfg = tables_config.get_config()
    cfg.results = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        tables.run(cfg)
    assert not (tmp_path / "nope").exists()
