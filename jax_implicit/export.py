"""`python -m jax_implicit.export --config.run=checkpoints/runs/NAME [--config.step=N]`

Any saved checkpoint step of a training run as an HF folder that `AutoModelForCausalLM.from_pretrained`, AlpacaEval
and serving engines load, with the chat template the model was trained in. Training exports its final step the
same way (`to_hf`). The step is restored verified (`checkpoint.py`), on the mesh the run config names.
"""

from __future__ import annotations

import json
from pathlib import Path

from ml_collections import ConfigDict

from jax_implicit import files, pretrained, prompts, runlock


def default_config() -> ConfigDict:
    return ConfigDict(dict(
        run="",  # a training run folder (train.out_dir): holds config.json and checkpoints/
        step=0,  # the checkpoint step to export; 0: the newest
        out="",  # "": <run>/hf-step<step>
    ))


def to_hf(cfg: ConfigDict, params: dict, out: Path, model_dir: Path, tokenizer, sh, dest: Path | None = None) -> Path:
    """The trained `params` of a run with config `cfg` as an HF folder (`dest`, default `<out>/hf`). LoRA runs also
    write the PEFT adapter (`<out>/adapter`) and export the adapter merged into the unquantised base weights, as
    RT does. Every process calls this (sharded tensors are gathered); process 0 writes."""
    from flax import nnx

    from jax_implicit import convert, distributed, lora, memory
    from jax_implicit import model as M

    writer = distributed.is_writer()
    tok_dir = Path(cfg.model.tokenizer or model_dir)
    if writer and not tok_dir.is_dir():
        tok_dir = Path(tokenizer.save_pretrained(out / "tokenizer")[0]).parent
    if cfg.lora.rank:
        adapted = lora.with_adapters(pretrained.load(cfg.model, sh, model_dir), cfg.lora, params)
        lora.export_peft(adapted, cfg.lora, out / "adapter", base_model=str(cfg.model.path))
        final = lora.merged(adapted)
    else:
        model_cfg = M.from_hf_config(model_dir, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype).replace(
            **memory.options(cfg.model))
        final = nnx.merge(nnx.split(M.abstract(model_cfg))[0], params)
    return convert.export_hf(final, dest or out / "hf", tokenizer_dir=tok_dir if writer else None,
                             chat_template=prompts.chat_template(cfg.data.tag_set, cfg.data.chat_format))


def run_config(run: Path) -> ConfigDict:
    """The training config a run folder was started with, checked like a fresh one."""
    from jax_implicit import train_config

    saved = run / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{run} is not a training run folder (no config.json)")
    try:
        values = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{saved} is damaged ({e})") from None
    cfg = train_config.default_config()
    cfg.update(values)
    train_config.check_config(cfg)
    return cfg


def run(cfg: ConfigDict) -> Path:
    """Export step `cfg.step` (0: the newest) of the run folder `cfg.run`; returns the HF folder."""
    from jax_implicit import checkpoint, memory, train_step
    from jax_implicit import model as M
    from jax_implicit.sharding import Sharder

    folder = Path(cfg.run).absolute()
    train = run_config(folder)
    if cfg.step < 0:
        raise ValueError(f"step={cfg.step} must be >= 0 (0: the newest)")
    model_dir, tokenizer = pretrained.locate(train.model)
    with runlock.hold(folder / ".lock", f"training folder {folder}"):  # not while the run is still writing it
        ckpts = checkpoint.Checkpoints(folder / "checkpoints", 1, train.train.max_to_keep)
        try:
            step = cfg.step or ckpts.latest_step()
            if step is None:
                raise FileNotFoundError(f"{folder}/checkpoints holds no checkpoint")
            sh = Sharder.from_config(train.mesh)
            model_cfg = M.from_hf_config(model_dir, param_dtype=train.model.param_dtype,
                                         dtype=train.model.dtype).replace(**memory.options(train.model))
            optimizer = train_step.make_optimizer(train.optim, 1)  # the schedule's length changes no shape
            abstract, _ = train_step.abstract_state(model_cfg, optimizer, train.train.seed, sh, train.lora)
            state, _ = ckpts.restore_step(step, abstract)
        finally:
            ckpts.close()
        dest = Path(cfg.out) if cfg.out else folder / f"hf-step{step}"
        files.remove_stale_tmp(dest)
        return to_hf(train, state["params"], folder, model_dir, tokenizer, sh, dest)


if __name__ == "__main__":
    from jax_implicit import checkpoint, cli

    cli.main(run, "configs/export.py", errors=(checkpoint.CheckpointError,))
