"""Refusal evaluation in the sweep's plan and in the tables command (fake seed results written here)."""

from pathlib import Path

import numpy as np

from configs.eval import safety_tables
from jax_implicit import cli, files, sweep
from jax_implicit.evaluate import layout, tables

ROOT = Path(__file__).resolve().parents[1]
ADV = [0.5, 0.7, 0.6]


def test_sweep_plans_a_refusal_evaluation_for_every_table_cell(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = files.load_config_file(ROOT / "configs" / "sweep.py", "llama2_7b")
    cfg.safety, cfg.allow_local_judge = True, True
    steps = sweep.plan(cfg)
    runs = [s for s in steps if s.module == "jax_implicit.evaluate.safety"]
    assert len(runs) == 7 * 5 * 5 + 2 * 5  # every tuned model, and the base model plain and x rules, per seed
    keys = set(cli.flat(files.load_config_file(ROOT / "configs/eval/safety.py")))
    made = set()
    for step in steps:
        made.add(step.product)
        if step in runs:
            flags = dict(a[len("--config."):].split("=", 1) for a in step.args if a.startswith("--config."))
            assert set(flags) <= keys
            if flags["model.path"] != "meta-llama/Llama-2-7b-hf":
                assert Path(flags["model.path"]) / "config.json" in made  # trained by an earlier step
            # an untrained model's replies do not depend on the seed: one cache for all its seeds
            assert ("cache" in flags) == (flags["run.method"] in ("base", "rules"))
            assert (flags["use_rules"] == "True") == (flags["run.method"] == "rules")
    t = safety_tables.get_config("10")
    for spec in t.tables.values():
        if spec.base == "llama2-7b":
            for _, method in spec.rows:
                for seed in cfg.seeds:
                    assert layout.seed_dir(cfg.results, "llama2-7b", method, seed) / "safety" / layout.RESULT in made
    plain = files.load_config_file(ROOT / "configs/sweep.py")
    plain.allow_local_judge = True
    assert not any(s.module.endswith("safety") for s in sweep.plan(plain))


def test_safety_table_mean_std_over_seeds(tmp_path):
    for seed, adv in enumerate(ADV, start=1):
        headline = {c: 0.25 for c in safety_tables.COLUMNS} | {"AdvBench": adv}
        files.write_json(layout.seed_dir(tmp_path, "llama2-7b", "response_10ep", seed) / "safety" / layout.RESULT,
                      dict(judge="local judge (x)", headline={"judge": headline, "prefix": {"AdvBench": 1.0}}))
    files.write_json(layout.seed_dir(tmp_path, "llama2-7b", "base", 1) / "safety" / layout.RESULT,
                  dict(judge=None, headline={"prefix": {"AdvBench": 1.0}}))  # no judge: not a judge cell
    cfg = safety_tables.get_config("10")
    cfg.results = str(tmp_path)
    shown = tables.run(cfg)
    text = (tmp_path / "safety_tables.md").read_text()
    assert shown == f"{text}\nwrote {tmp_path / 'safety_tables.md'}" and not (tmp_path / "tables.md").exists()
    block = text.split("### Refusal evaluation, Llama-2-7B")[1].split("###")[0]
    line = next(x for x in block.splitlines() if x.startswith("| Response tuning |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    adv = 100 * np.array(ADV)
    assert cells[0] == f"{adv.mean():.1f} ± {adv.std(ddof=1):.1f} (3/5 seeds)"
    assert cells[1:] == ["25.0 ± 0.0 (3/5 seeds)"] * (len(safety_tables.COLUMNS) - 1)
    base = next(x for x in block.splitlines() if x.startswith("| Base model |"))
    assert set(c.strip() for c in base.strip("|").split("|")[1:]) == {"–"}
    assert "Judge: local judge (x)." in text and "Refusal cells" in text and "Head-to-head cells" not in text
