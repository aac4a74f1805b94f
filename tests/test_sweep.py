"""The paper's sweep: its plan covers every table cell in a runnable order, and a small sweep runs for real
through the gpu_host launcher into the results folder that the tables command reads."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from configs.eval import tables as tables_config
from jax_implicit import cli, files, sweep
from jax_implicit.evaluate import layout

ROOT = Path(__file__).resolve().parents[1]


def flags(step: sweep.Step) -> dict[str, str]:
    return dict(a[len("--config."):].split("=", 1) for a in step.args if a.startswith("--config."))


def test_paper_sweep_plan(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = files.load_config_file(ROOT / "configs" / "sweep.py", "llama2_7b")
    cfg.allow_local_judge = True
    steps = sweep.plan(cfg)
    trains = [s for s in steps if s.module == "jax_implicit.train"]
    assert len(trains) == 7 * 5 * 5  # every task x epochs x seed, once
    assert len({s.product for s in steps}) == len(steps)

    # every command's config file loads and every override names a key it has
    for step in steps:
        spec = step.args[0].removeprefix("--config=")
        path, _, arg = spec.partition(":")
        keys = set(cli.flat(files.load_config_file(ROOT / path, arg or None)))
        assert set(flags(step)) <= keys, (step.module, set(flags(step)) - keys)

    # every input is a product of an earlier step, or the base model
    made = set()
    for step in steps:
        f = flags(step)
        for key in ("outputs", "references"):
            if key in f:
                assert Path(f[key]) in made, (step, key)
        if "model.path" in f and f["model.path"] != "meta-llama/Llama-2-7b-hf":
            assert Path(f["model.path"]) / "config.json" in made, step
        made.add(step.product)

    # every cell of the paper's tables (Llama-2 column, local judge offline) has a producer per seed
    t = tables_config.get_config("10")
    judge = "local-" + Path(files.load_config_file(ROOT / "configs/eval/alpaca.py").judge.model.path).name
    for spec in t.tables.values():
        for _, method in spec.rows:
            for seed in cfg.seeds:
                folder = layout.seed_dir(cfg.results, "llama2-7b", method, seed)
                want = folder / (layout.RANKING if spec.kind == "ranking" else f"alpaca_eval/{judge}/{layout.RESULT}")
                assert want in made, want

    # the launcher takes every step: its own dry run prints the one command it would run
    for step in (trains[0], next(s for s in steps if s.module == "jax_implicit.evaluate.alpaca")):
        argv = sweep.command(cfg, step, first=False)
        proc = subprocess.run([*argv, "--dry-run"], cwd=ROOT, capture_output=True, text=True, check=True)
        (line,) = proc.stdout.splitlines()
        inner = shlex.split(line)
        assert inner[inner.index("-m") + 1] == step.module and inner[-len(step.args):] == list(map(str, step.args))


def test_sweep_settings_are_checked():
    cfg = files.load_config_file(ROOT / "configs" / "sweep.py", "olmo_7b")
    cfg.tasks, cfg.allow_local_judge = ("response",), True
    with pytest.raises(ValueError, match="keep 'instruction' in sweep.tasks"):
        sweep.plan(cfg)
    cfg.tasks, cfg.epochs = ("instruction",), (3,)
    with pytest.raises(ValueError, match="not understood: \\['3'\\]"):
        sweep.plan(cfg)
    with pytest.raises(ValueError, match="unknown sweep model"):
        files.load_config_file(ROOT / "configs" / "sweep.py", "gpt2")


def test_small_sweep_runs_and_resumes(tiny_long_context, data_dir, tmp_path, monkeypatch):
    """Instruction tuning (the reference) and the base model, on a tiny model, for real: train, greedy
    outputs, a local-judge head-to-head and ranking, each through launch/gpu_host.sh as its own process."""
    monkeypatch.setenv("XLA_FLAGS", "")  # one device per process
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = data_dir
    cfg = files.load_config_file(ROOT / "configs" / "sweep.py", "llama2_7b")
    cfg.update(model_path=str(tiny_long_context), tasks=("instruction",), epochs=(5,), reference_epochs=5, seeds=(1,),
               rules=(), eval_sets=("val",), ranking_data=str(data / "dolly/dolly_train.json"),
               judge_model=str(tiny_long_context), runs=str(tmp_path / "runs"), results=str(tmp_path / "results"),
               allow_local_judge=True)
    cfg.extra.update(
        train=f"--config.data.path={data}/lima/lima_data.jsonl --config.data.limit=4 --config.data.max_seq_length=64 "
              "--config.data.bucket_min=64 --config.train.global_batch=4 --config.train.micro_batch=4 "
              "--config.model.dtype=float32",
        generate="--config.data.limit=3 --config.decode.max_new_tokens=8",
        ranking="--config.n=4 --config.k=2 --config.max_seq_length=128")
    done = sweep.run(cfg)
    assert [s.module.rsplit(".", 1)[-1] for s in done] == ["train", "generate", "ranking", "generate", "alpaca",
                                                           "ranking"]
    judge = f"local-{tiny_long_context.name}"
    proc = subprocess.run([sys.executable, "-m", "jax_implicit.evaluate.tables", "--config=configs/eval/tables.py:5",
                           f"--config.results={cfg.results}", "--config.eval_set=val", f"--config.judge={judge}",
                           "--config.seeds=1"], cwd=ROOT, capture_output=True, text=True, check=True)
    text = (Path(cfg.results) / "tables.md").read_text()
    assert text in proc.stdout
    t1 = text.split("### Table 1")[1].split("###")[0]
    t2 = text.split("### Table 2")[1].split("###")[0]
    assert next(line for line in t1.splitlines() if line.startswith("| Base model |")).split("|")[2].strip() != "–"
    for row in ("Base model", "Instruction tuning"):
        assert next(line for line in t2.splitlines() if line.startswith(f"| {row} |")).split("|")[2].strip() != "–"
    assert sweep.run(cfg) == []  # everything is done: a second run resumes to nothing
    # the same folders with another setting (a pilot with another learning rate) stop before anything runs
    cfg.extra.train += " --config.optim.lr=1e-3"
    with pytest.raises(ValueError, match=r"seed1/hf/config.json exists but was made by another command"):
        sweep.run(cfg)


def test_the_paper_grid_refuses_the_local_judge_unless_asked(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = files.load_config_file(ROOT / "configs" / "sweep.py", "olmo_7b")
    with pytest.raises(ValueError, match=r"resolves to the local judge \(no OPENAI_API_KEY is set\).*allow_local_judge"):
        sweep.run(cfg)
