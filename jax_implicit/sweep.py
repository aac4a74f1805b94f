"""The paper's full sweep for one base model, in one command, through the launch scripts.

    python -m jax_implicit.sweep --config=configs/sweep.py:llama2_7b --config.launcher=gpu_host
    python -m jax_implicit.evaluate.tables --config=configs/eval/tables.py:10 --config.judge=...   # printed at the end

Every tuning run (task x epochs x seed, configs/train/paper.py) trains through `launch/<launcher>`
on all its hosts; greedy outputs (jax_implicit.generate), AlpacaEval head-to-heads against the
instruction-tuned model of the same seed (evaluate.alpaca) and response ranking (evaluate.ranking)
run through the same launcher as one process. They write the results layout (evaluate/layout.py)
that `evaluate.tables` reads:

    results/<base>/<method>/outputs/<eval_set>.json                 base model, base x rules (no training)
    results/<base>/<method>_<E>ep/seed<N>/outputs/<eval_set>.json   tuned models
    results/<base>/<method>[_<E>ep]/seed<N>/<eval_set>/<judge>/result.json, ranking.json
    results/<base>/<method>[_<E>ep]/seed<N>/safety/result.json      with `safety=True` (evaluate.safety)

A step whose product file exists here, next to a record of the command that made it (`.<product>.step`,
holding a hash of the command), is skipped, so running the same command again resumes an interrupted
sweep (on tpu_pod the products live on worker 0: run the sweep from there to resume). A product made by
another command (another model path, learning rate, ...) stops the sweep before anything runs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import shlex
import subprocess
import time
from pathlib import Path

from ml_collections import ConfigDict

from jax_implicit import datasets, files
from jax_implicit.evaluate import alpaca, layout

ROOT = Path(__file__).resolve().parents[1]
LIMA_ROWS = datasets.CATALOG["lima"].rows  # training examples per epoch, at most (the single-task sets use 1000)
ROWS = {"instruction": LIMA_ROWS, "response": LIMA_ROWS}  # per tuning task; the single-task sets: 1000
TARGETS = {"gpu_host": "gpu-8x80gb", "slurm": "gpu-8x80gb", "tpu_pod": "tpu-v5p-8"}  # chip-hours by launcher
EVAL_ROWS = {name: datasets.CATALOG[name].rows for name in ("val", "alpaca_eval")}  # instructions per set
LAUNCHERS = {"gpu_host": "launch/gpu_host.sh", "tpu_pod": "launch/tpu_pod.sh", "slurm": "launch/slurm.sbatch"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the sweep and the file that exists once it has run."""

    module: str
    args: tuple[str, ...]
    product: Path

    @property
    def record(self) -> Path:
        """Beside the product: the hash of the command that made it."""
        return self.product.parent / f".{self.product.name}.step"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.module, *self.args]).encode()).hexdigest()[:16]

    def done(self) -> bool:
        """Made by this very command; a product made by another command is an error, not a skip."""
        product, record = ROOT / self.product, ROOT / self.record
        if not product.is_file():
            return False
        made_by = json.loads(record.read_text())["hash"] if record.is_file() else "no record"
        if made_by != self.digest:
            raise ValueError(f"{self.product} exists but was made by another command ({made_by}, this one is "
                             f"{self.digest}); move it away, or give this sweep its own results/runs folders")
        return True


def _overrides(**values) -> tuple[str, ...]:
    return tuple(f"--config.{k.replace('__', '.')}={v}" for k, v in values.items())


def judge(cfg: ConfigDict) -> tuple[str, str]:
    """The judge kind the sweep's head-to-heads use and their folder in the results layout. The paper's grid is
    judged by GPT-4: the local judge only when `allow_local_judge` says so."""
    kind = alpaca.judge_kind(cfg.judge)
    if kind == "local" and not cfg.allow_local_judge:
        raise ValueError(f"sweep.judge={cfg.judge!r} resolves to the local judge (no OPENAI_API_KEY is set), whose "
                         "win rates are not comparable with the paper's GPT-4 judge; set OPENAI_API_KEY, or "
                         "--config.allow_local_judge=True to judge the grid locally")
    defaults = files.load_config_file(ROOT / "configs" / "eval" / "alpaca.py")
    if cfg.judge_model:
        defaults.judge.model.path = cfg.judge_model
    return kind, alpaca.judge_names(defaults, kind)[0]


def plan(cfg: ConfigDict) -> list[Step]:
    """Every step of the sweep in an order where each one's inputs come from earlier steps."""
    paper = ROOT / "configs" / "train" / "paper.py"
    for name in ("epochs", "seeds", "tasks", "eval_sets"):
        if not cfg[name]:
            raise ValueError(f"sweep.{name} is empty")
    train_cfg = {(t, e, s): files.load_config_file(paper, f"{cfg.model},{t},{e},seed{s}")
                 for t in cfg.tasks for e in cfg.epochs for s in cfg.seeds}  # also checks every name
    model_path = cfg.model_path or next(iter(train_cfg.values())).model.path
    kind, folder = judge(cfg)
    judge_model = {"judge__model__path": cfg.judge_model} if cfg.judge_model else {}
    results = Path(cfg.results)

    def seed_dir(m: str, seed: int) -> Path:
        return layout.seed_dir(results, cfg.base, m, seed)

    def outputs(m: str, seed: int | None, eval_set: str) -> Path:
        return (results / cfg.base / m if seed is None else seed_dir(m, seed)) / "outputs" / f"{eval_set}.json"

    def generate(m: str, seed: int | None, path: str, variant: str) -> list[Step]:
        spec = "--config=configs/generate.py" + (f":{variant}" if variant else "")
        return [Step("jax_implicit.generate", (spec, *_overrides(
            model__path=path, data__instructions=s, generator=f"{cfg.base}-{m}", output=outputs(m, seed, s)),
            *shlex.split(cfg.extra.generate)), outputs(m, seed, s)) for s in cfg.eval_sets]

    def judged(m: str, seed: int, outs_seed: int | None) -> list[Step]:
        ref = layout.method("instruction", cfg.reference_epochs)
        return [Step("jax_implicit.evaluate.alpaca", ("--config=configs/eval/alpaca.py", *_overrides(
            outputs=outputs(m, outs_seed, s), references=outputs(ref, seed, s), eval_set=s, judge__kind=kind,
            **judge_model, run__results=results, run__base=cfg.base, run__method=m, run__seed=seed),
            *shlex.split(cfg.extra.alpaca)), seed_dir(m, seed) / s / folder / layout.RESULT) for s in cfg.eval_sets]

    def ranked(m: str, seed: int, path: str) -> Step:
        return Step("jax_implicit.evaluate.ranking", ("--config=configs/eval/ranking.py", *_overrides(
            model__path=path, data=cfg.ranking_data, run__results=results, run__base=cfg.base,
            run__method=m, run__seed=seed), *shlex.split(cfg.extra.ranking)), seed_dir(m, seed) / layout.RANKING)

    def refusals(m: str, seed: int, path: str, use_rules: bool = False, untrained: bool = False) -> list[Step]:
        """The refusal evaluation, if asked for; an untrained model's replies are cached once for all seeds."""
        shared = {"cache": results / cfg.base / m / "outputs"} if untrained else {}
        return [Step("jax_implicit.evaluate.safety", ("--config=configs/eval/safety.py", *_overrides(
            model__path=path, use_rules=use_rules, run__results=results, run__base=cfg.base, run__method=m,
            run__seed=seed, **shared), *shlex.split(cfg.extra.safety)),
            seed_dir(m, seed) / layout.SAFETY / layout.RESULT)] if cfg.safety else []

    def tuned(task: str, epochs: int, seed: int) -> list[Step]:
        m = layout.method(task, epochs)
        out = Path(cfg.runs) / Path(train_cfg[task, epochs, seed].train.out_dir).name
        hf = out / "hf"
        path = {"model__path": cfg.model_path} if cfg.model_path else {}
        train = Step("jax_implicit.train", (f"--config=configs/train/paper.py:{cfg.model},{task},{epochs},seed{seed}",
                                            *_overrides(train__out_dir=out, **path), *shlex.split(cfg.extra.train)),
                     hf / "config.json")  # written last, by the HF export
        steps = [train, *generate(m, seed, str(hf), "no_rules"), ranked(m, seed, str(hf)), *refusals(m, seed, str(hf))]
        is_reference = task == "instruction" and epochs == cfg.reference_epochs
        return steps if is_reference else steps + judged(m, seed, seed)

    if "instruction" not in cfg.tasks or cfg.reference_epochs not in cfg.epochs:
        raise ValueError(f"the sweep judges every model against instruction tuning for {cfg.reference_epochs} epochs "
                         f"(sweep.reference_epochs): keep 'instruction' in sweep.tasks and {cfg.reference_epochs} "
                         "in sweep.epochs")
    steps = [s for seed in cfg.seeds for s in tuned("instruction", cfg.reference_epochs, seed)]
    for variant in ("no_rules", *cfg.rules):
        m = layout.rules_method(variant)
        steps += generate(m, None, model_path, variant)
        steps += [s for seed in cfg.seeds for s in judged(m, seed, None)]
        if variant in ("no_rules", ""):
            steps += [s for seed in cfg.seeds for s in refusals(m, seed, model_path, variant == "", untrained=True)]
    steps += [ranked("base", seed, model_path) for seed in cfg.seeds]
    for task in cfg.tasks:
        for epochs in cfg.epochs:
            if not (task == "instruction" and epochs == cfg.reference_epochs):
                steps += [s for seed in cfg.seeds for s in tuned(task, epochs, seed)]
    return steps


def command(cfg: ConfigDict, step: Step, first: bool) -> list[str]:
    """The launcher call that runs one step."""
    if cfg.launcher not in LAUNCHERS:
        raise ValueError(f"sweep.launcher={cfg.launcher!r}; expected one of {sorted(LAUNCHERS)}")
    setup = [] if cfg.setup and first else ["--skip-setup"]
    return ["bash", LAUNCHERS[cfg.launcher], *setup, *shlex.split(cfg.launcher_args), f"--module={step.module}",
            *map(str, step.args)]


def tables_command(cfg: ConfigDict) -> str:
    return shlex.join([".venv/bin/python", "-m", "jax_implicit.evaluate.tables",
                       f"--config=configs/eval/tables.py:{cfg.reference_epochs}", f"--config.results={cfg.results}",
                       f"--config.judge={judge(cfg)[1]}", f"--config.seeds={len(cfg.seeds)}"])


def estimate(cfg: ConfigDict, steps: list[Step]) -> str:
    """What the steps are, by command, and a rough upper bound of their compute: 6 N T FLOPs per training
    (every example at max_seq_length) and 2 N T per decoded instruction (prompt + max_new_tokens); and the
    trainings' chip-hours on `cfg.target` at the planner's roofline step time (the paper's batch of 64
    sequences of max_seq_length, the 7B configs' remat and precision)."""
    from jax_implicit import memory
    from jax_implicit import plan as planner

    counts = collections.Counter(s.module.rsplit(".", 1)[-1] for s in steps)
    paper = files.load_config_file(ROOT / "configs" / "train" / "paper.py", f"{cfg.model},instruction")
    model_cfg = planner.model_config(paper.model.path, paper.model.param_dtype, paper.model.dtype)
    params = planner.param_count(model_cfg)
    target = cfg.target or TARGETS[cfg.launcher]
    seconds, _ = planner.roofline(model_cfg.replace(**memory.options(paper.model)), params, target,
                                  paper.train.micro_batch, paper.data.max_seq_length, paper.train.global_batch)
    optimizer_steps = sum(-(-ROWS.get(_task(s), 1000) // paper.train.global_batch) * int(_flag(s, "epochs", "10"))
                          for s in steps if s.module.endswith(".train"))
    chip_hours = optimizer_steps * seconds * planner.hardware_spec(target).chip_count / 3600
    decode_cfg = files.load_config_file(ROOT / "configs" / "generate.py").decode
    train_flops = sum(6 * params * LIMA_ROWS * int(_flag(s, "epochs", "10")) * paper.data.max_seq_length
                      for s in steps if s.module.endswith(".train"))
    decode_flops = sum(2 * params * EVAL_ROWS.get(_flag(s, "data.instructions", ""), 0) * (256 + decode_cfg.max_new_tokens)
                       for s in steps if s.module.endswith(".generate"))
    return (", ".join(f"{n} {name}" for name, n in counts.items()) + f"; at most {train_flops / 1e18:.1f} EFLOP of "
            f"training and {decode_flops / 1e18:.2f} EFLOP of decoding ({params / 1e9:.2f} B parameters); "
            f"training: {optimizer_steps} optimizer steps, ~{chip_hours:.0f} chip-hours on {target} at the roofline "
            f"({seconds:.2f} s per step)")


def _task(step: Step) -> str:
    """The tuning task in a paper.py config string (`llama2_7b,response,10,seed1` -> `response`)."""
    spec = next(a for a in step.args if a.startswith("--config=configs/train/paper.py:"))
    return spec.split(":", 1)[1].split(",")[1]


def _flag(step: Step, key: str, default: str) -> str:
    """A setting of the step's command line: an override, or the epochs in a paper.py config string."""
    for arg in step.args:
        if arg.startswith(f"--config.{key}="):
            return arg.split("=", 1)[1]
        if key == "epochs" and arg.startswith("--config=configs/train/paper.py:"):
            return arg.split(",")[2]
    return default


def run(cfg: ConfigDict) -> list[Step]:
    """Run (or with `dry_run` print) every step not done yet; returns the steps that were run or printed."""
    steps = plan(cfg)
    todo = [s for s in steps if not s.done()]  # relative paths are the checkout's
    print(f"sweep {cfg.model}: {len(steps)} steps, {len(steps) - len(todo)} already done, {len(todo)} to run: "
          f"{estimate(cfg, todo)}", flush=True)
    print(f"judge: {judge(cfg)[1]}", flush=True)
    for i, step in enumerate(todo):
        argv = command(cfg, step, first=i == 0)
        if cfg.dry_run:
            print(shlex.join(argv))
            continue
        print(f"\n[{i + 1}/{len(todo)}] {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True)
        if not (ROOT / step.product).is_file():
            raise RuntimeError(f"step {i + 1} finished without writing {step.product}")
        files.write_json(ROOT / step.record, {"hash": step.digest, "module": step.module, "args": list(step.args)})
        print(f"[{i + 1}/{len(todo)}] done in {time.perf_counter() - start:.0f} s -> {step.product}", flush=True)
    print(f"\ntables: {tables_command(cfg)}")
    return todo


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(lambda cfg: f"{len(run(cfg))} steps {'printed' if cfg.dry_run else 'run'}", "configs/sweep.py")
