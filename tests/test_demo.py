"""The main job on a tiny configuration, through the same code path as `make demo`."""

import json
from pathlib import Path

import pytest

from jax_implicit import demo, demo_report, files

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(model: Path, tmp_path: Path):
    cfg = files.load_config_file(ROOT / "configs" / "demo.py")
    cfg.model.path = cfg.judge_model.path = str(model)
    cfg.update(instructions=3, max_new_tokens=8, side_by_side=2, judged=3,
               work=str(tmp_path / "work"), report=str(tmp_path / "report"))
    cfg.tune.update(examples=8, max_seq_length=64, global_batch=4, micro_batch=4, epochs=2, lr=1e-3)
    cfg.ranking.update(examples=4, k=2)
    return cfg


def test_demo_writes_every_report_file(tiny_long_context, data_dir, tmp_path, capsys):
    report = demo.run(tiny_config(tiny_long_context, tmp_path))
    for name in demo_report.FILES:
        assert (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    assert set(results["variants"]) == set(demo.VARIANTS)
    for name in ("base+rules", "response-tuned"):
        assert results["variants"][name]["n_judged"] == 3
    assert results["tuning"]["steps"] == 4 and results["tuning"]["examples"] == 8
    # values a broken pipeline gets wrong: tuning lowered the loss and changed the answers and the ranking
    # scores, and the judge scores a model against itself at exactly 50% (on this random tiny model the rules'
    # small offsets do not change 8 greedy tokens; test_decode and test_rules check them against references)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "work" / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses
    outputs = {n: [r["output"] for r in json.loads((tmp_path / "work" / "outputs" / f"{n}.json").read_text())]
               for n in demo.VARIANTS}
    assert outputs["response-tuned"] != outputs["base"]
    assert results["variants"]["base"]["ranking"] != results["variants"]["response-tuned"]["ranking"] or \
        json.loads((tmp_path / "work" / "ranking" / "base.json").read_text())["real"] != \
        json.loads((tmp_path / "work" / "ranking" / "response-tuned.json").read_text())["real"]
    base = tmp_path / "work" / "outputs" / "base.json"
    assert demo._judge(tiny_config(tiny_long_context, tmp_path), base, base, "self")["win_rate"] == pytest.approx(50.0)
    assert results["export_max_abs_logit_diff"] < 1e-3
    assert "not comparable" in (report / "summary.md").read_text()
    assert (report / "loss.png").read_bytes()[:4] == b"\x89PNG"
    side = (report / "side_by_side.md").read_text()
    assert side.count("**base+rules**") == 2
    assert "win rate vs base" in capsys.readouterr().out
    assert str(data_dir) in results["data"]


def test_echoes_prompt():
    instruction = "Give me a recipe for tiramisu. Use mascarpone."
    assert demo_report.echoes_prompt(instruction, "Sure.\nGive me a recipe for tiramisu. Use mascarpone, please")
    assert demo_report.echoes_prompt(instruction, "Ladyfingers, coffee.\n<|user|>\nThanks")
    assert not demo_report.echoes_prompt(instruction, "Soak ladyfingers in coffee, layer with mascarpone cream.")


def test_missing_data_file_is_named_before_any_model_work(tmp_path):
    cfg = tiny_config(tmp_path / "no-model", tmp_path)
    cfg.data.lima = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match=r"^--config.data.lima: data file .*nowhere.jsonl does not exist$"):
        demo.run(cfg)
