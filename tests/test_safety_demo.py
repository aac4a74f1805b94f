"""The safety demo on a tiny configuration, through the same code path as `make safety-demo`."""

import json
from pathlib import Path

from jax_implicit import files, safety_demo

ROOT = Path(__file__).resolve().parents[1]


def test_safety_demo_writes_its_report(tiny_long_context, data_dir, tmp_path):
    cfg = files.load_config_file(ROOT / "configs" / "safety_demo.py")
    cfg.model.path = str(tiny_long_context)
    cfg.update(limit=1, max_new_tokens=4, work=str(tmp_path / "work"),
               report=str(tmp_path / "report"))
    cfg.tune.update(examples=8, max_seq_length=64, global_batch=4, micro_batch=4)
    cfg.refusals.update(n=4)
    report = safety_demo.run(cfg)
    results = json.loads((report / "results.json").read_text())
    assert list(results["models"]) == list(safety_demo.VARIANTS)
    assert results["tuning"]["response-tuned"] == dict(results["tuning"]["response-tuned"], examples=8, steps=2)
    assert results["tuning"]["response-tuned+refusals"]["examples"] == 12
    assert results["tuning"]["response-tuned+refusals"]["steps"] == 3
    assert results["models"]["base+rules"]["use_rules"] and not results["models"]["base"]["use_rules"]
    for name in safety_demo.VARIANTS:
        assert results["models"][name]["n"] == 5 and list(results["models"][name]["headline"]) == ["prefix"]
        assert (report / f"refusal_rates_{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (report / "summary.md").read_text()
    assert "| response-tuned+refusals | prefix | 5 |" in summary and "| total |" in summary
