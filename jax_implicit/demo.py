"""The main job (`make demo`): the paper's pipeline end to end on a real model, offline.

A model's greedy answers, the same model times the three-rule adapter, and the model after a short
response-tuning run, side by side on the paper's validation instructions; head-to-head judgements
through alpaca_eval with the local judge; the response-ranking capability before and after tuning;
the tuned model exported to HF and reloaded with transformers. Everything lands in a report folder
(markdown + PNG plots) and a results table in the terminal.

Every stage is the project's own command (`generate.run`, `train.run`, `evaluate.*.run`), called
with a config derived from `configs/demo.py`, so the demo exercises the real code paths.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ml_collections import ConfigDict

from jax_implicit import convert, datasets, files, pretrained, prompts

VARIANTS = ("base", "base+rules", "response-tuned")


def data_sources(cfg: ConfigDict) -> tuple[dict[str, str], str]:
    """The demo's three datasets (each a name, file or hub id, resolved before any model work), and a
    sentence saying where they come from."""
    found = {role: datasets.resolve(spec, flag=f"--config.data.{role}") for role, spec in cfg.data.items()}
    note = "; ".join(f"{role}: {spec} ({found[role]})" for role, spec in cfg.data.items())
    return {role: str(source.path or source.spec) for role, source in found.items()}, note


class Stages:
    """Runs named stages in order with a header and a wall time for each."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, {}

    def __call__(self, name: str, fn: Callable, *args, **kw):
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {name}", flush=True)
        start = time.perf_counter()
        out = fn(*args, **kw)
        self.times[name] = time.perf_counter() - start
        return out


def _generate(cfg: ConfigDict, model_dir: Path, use_rules: bool, name: str, val: str) -> Path:
    from jax_implicit import generate

    g = _load_config("configs/generate.py")
    g.model.update(path=str(model_dir), param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    g.use_rules = use_rules
    g.data.update(instructions=val, limit=cfg.instructions)
    g.decode.update(max_new_tokens=cfg.max_new_tokens)
    g.update(generator=name, output=str(Path(cfg.work) / "outputs" / f"{name}.json"))
    return generate.run(g)


def _tune(cfg: ConfigDict, model_dir: Path, lima: str, refusals: ConfigDict | None = None, name: str = "tune"):
    """Response tuning on the first `tune.examples` LIMA rows, with `refusals` mixed in when given."""
    from jax_implicit import train

    t = _load_config("configs/train/smollm2_cpu.py", "response")
    t.model.update(path=str(model_dir), param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    t.data.update(path=lima, limit=cfg.tune.examples, max_seq_length=cfg.tune.max_seq_length,
                  bucket_min=min(t.data.bucket_min, cfg.tune.max_seq_length))
    if refusals is not None:
        t.data.refusals.update(refusals)
    t.optim.update(lr=cfg.tune.lr)
    t.train.update(epochs=cfg.tune.epochs, global_batch=cfg.tune.global_batch, micro_batch=cfg.tune.micro_batch,
                   out_dir=str(Path(cfg.work) / name))
    return train.run(t)


def _ranking_examples(cfg: ConfigDict, source: str) -> Path:
    """The first `ranking.examples` rows without an input passage: passages of hundreds of tokens would
    make the ranking stage the demo's slowest, and the paper's question (does the model prefer the
    response written for this instruction?) needs none."""
    from jax_implicit.evaluate import ranking

    rows = [r for r in ranking.load_examples(source, 8 * cfg.ranking.examples) if not r.get("input", "").strip()]
    if len(rows) < cfg.ranking.examples:
        raise ValueError(f"ranking data {source}: only {len(rows)} of its first {8 * cfg.ranking.examples} rows have "
                         f"no input passage; ranking.examples={cfg.ranking.examples} needs more")
    return files.write_json(Path(cfg.work) / "ranking" / "examples.json", rows[:cfg.ranking.examples])


def _rank(cfg: ConfigDict, model_dir: Path, examples: Path, name: str) -> dict:
    from jax_implicit.evaluate import ranking

    r = _load_config("configs/eval/ranking.py")
    r.model.update(path=str(model_dir), param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    r.run.seed = cfg.ranking.seed
    r.update(data=str(examples), n=cfg.ranking.examples, k=cfg.ranking.k,
             max_seq_length=cfg.ranking.max_seq_length, out=str(Path(cfg.work) / "ranking" / f"{name}.json"))
    return ranking.run(r)


def _judge(cfg: ConfigDict, outputs: Path, references: Path, name: str) -> dict:
    from jax_implicit.evaluate import alpaca

    a = _load_config("configs/eval/alpaca.py")
    a.update(outputs=str(outputs), references=str(references), eval_set="val", name=name,
             max_instances=cfg.judged, out=str(Path(cfg.work) / "judge" / name))
    a.judge.update(kind="local")
    a.judge.model.update(path=str(pretrained.model_dir(cfg.judge_model.path)))
    return alpaca.run(a)


def _check_export(hf_dir: Path, prompt: str) -> float:
    """Reload the exported folder with transformers; max |logit difference| against our model of it."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jax_implicit import model as M

    ids = np.asarray(AutoTokenizer.from_pretrained(hf_dir)(prompt)["input_ids"], np.int32)[None]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    mask = jnp.ones(ids.shape, bool)
    ours, _ = convert.load_hf(hf_dir)(jnp.asarray(ids), M.positions_from_mask(mask), mask)
    return float(np.abs(np.asarray(ours) - ref).max())


def _load_config(spec: str, arg: str | None = None) -> ConfigDict:
    return files.load_config_file(Path(__file__).resolve().parents[1] / spec, arg)


def run(cfg: ConfigDict) -> Path:
    """The whole demo; returns the report folder."""
    from jax_implicit import demo_report
    from jax_implicit import model as M

    start = time.perf_counter()
    sources, data_note = data_sources(cfg)
    print(f"data: {data_note}")
    stages = Stages(total=10)
    model_dir = stages("model: convert the real weights into checkpoints/", pretrained.model_dir, cfg.model.path)
    M.from_hf_config(model_dir)  # an unsupported model fails here, before anything compiles
    outs = {"base": stages("greedy answers (base)", _generate, cfg, model_dir, False, "base", sources["val"]),
            "base+rules": stages("greedy answers x three rules", _generate, cfg, model_dir, True, "base+rules",
                                 sources["val"])}
    tuned = stages("response tuning (LIMA responses, instructions replaced by '')", _tune, cfg, model_dir,
                   sources["lima"])
    outs["response-tuned"] = stages("greedy answers (response-tuned)", _generate, cfg, tuned.hf_dir, False,
                                    "response-tuned", sources["val"])
    examples = _ranking_examples(cfg, sources["ranking"])
    ranks = {"base": stages("response ranking (base)", _rank, cfg, model_dir, examples, "base"),
             "response-tuned": stages("response ranking (response-tuned)", _rank, cfg, tuned.hf_dir, examples,
                                      "response-tuned")}
    judged = {v: stages(f"head-to-head: {v} vs base (local judge)", _judge, cfg, outs[v], outs["base"], v)
              for v in ("base+rules", "response-tuned")}
    export_diff = stages("export check: reload the tuned HF export with transformers", _check_export,
                         tuned.hf_dir, prompts.generation_prompt("Name three colours."))
    report = demo_report.write(Path(cfg.report), cfg=cfg, data_note=data_note, model_dir=model_dir, outputs=outs,
                               tuned=tuned, ranks=ranks, judged=judged, export_diff=export_diff,
                               stage_seconds=stages.times, total_seconds=time.perf_counter() - start)
    print(demo_report.terminal_table(report))
    return Path(cfg.report)


if __name__ == "__main__":
    from absl import logging

    from jax_implicit import cli

    logging.set_verbosity(logging.WARNING)  # the stages print their own progress; INFO is JAX's and orbax's chatter
    cli.main(run, "configs/demo.py")
