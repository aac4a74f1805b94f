"""What a training config holds and what it may hold: the schema every config file starts from
(`default_config`) and the checks that run before anything loads or compiles, including whether a run
folder may be resumed with the config given.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ml_collections import ConfigDict

from jax_implicit import cli, config, data, files, lora, memory
from jax_implicit import model as M

REDUCTIONS = ("example", "token")
NONFINITE = ("stop", "skip")  # what a step whose update is not finite does (it is never applied)
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config that cannot run, reported before anything loads or compiles."""


def optim_config(lr: float = 1e-5, schedule: str = "cosine", warmup_ratio: float = 0.1,
                 clip_norm: float = 0.0) -> ConfigDict:
    """Adam (weight decay 0). `schedule`: "cosine" (linear warmup over `warmup_ratio` of the steps, cosine to 0:
    the paper), "linear" (linear decay to 0: the authors' scripts, with warmup 0.03) or "constant" (after
    the warmup: Response Tuning's recipe). `clip_norm` 0: off."""
    return ConfigDict(dict(lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, clip_norm=clip_norm,
                           b1=0.9, b2=0.999, eps=1e-8))


def train_config(epochs: int = 10, global_batch: int = 64, micro_batch: int = 8, reduction: str = "example",
                 seed: int = 1, out_dir: str = "checkpoints/runs/default", checkpoint_every: int = 50,
                 max_to_keep: int = 3, export_hf: bool = True, nonfinite: str = "stop",
                 allow_config_change: bool = False, heldout: int = 0, eval_every: int = 0,
                 tensorboard: bool = True) -> ConfigDict:
    """`nonfinite`: a step whose loss or update is not finite is never applied; "stop" ends the run there,
    "skip" leaves the state as it was, counts it and goes on with the next batch. `allow_config_change`:
    resume a run folder even though settings that change the numbers differ from the ones it started with.
    `heldout`: examples kept out of training (a choice fixed by the seed) whose loss is logged every
    `eval_every` steps. `tensorboard`: also write the metrics as TensorBoard event files."""
    return ConfigDict(dict(epochs=epochs, global_batch=global_batch, micro_batch=micro_batch, reduction=reduction,
                           seed=seed, out_dir=out_dir, checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                           export_hf=export_hf, nonfinite=nonfinite, allow_config_change=allow_config_change,
                           heldout=heldout, eval_every=eval_every, tensorboard=tensorboard))


def default_config() -> ConfigDict:
    """Every key a training config may hold (config files start from this and change values)."""
    return ConfigDict(dict(model=config.model(), mesh=config.mesh(), data=data.data_config(),
                           optim=optim_config(), train=train_config(), lora=lora.lora_config()))


def check_config(cfg: ConfigDict) -> None:
    """Unknown or missing keys and impossible values, with the key named."""
    known, given = cli.flat(default_config()), cli.flat(cfg)
    for key in given:
        if key not in known:
            raise ConfigError(cli.unknown_key(key, sorted(known)))
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config lacks keys {missing} (start from train_config.default_config())")
    t, o = cfg.train, cfg.optim
    checks = [
        (t.reduction in REDUCTIONS, f"train.reduction={t.reduction!r}; expected one of {REDUCTIONS}"),
        (o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}; expected one of {SCHEDULES}"),
        (math.isfinite(o.lr) and o.lr > 0 and 0 <= o.warmup_ratio < 1,
         f"optim.lr={o.lr} must be finite and > 0 and warmup_ratio={o.warmup_ratio} in [0, 1)"),
        (t.nonfinite in NONFINITE, f"train.nonfinite={t.nonfinite!r}; expected one of {NONFINITE}"),
        (t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1"),
        (t.checkpoint_every >= 1 and t.max_to_keep >= 1,
         f"train.checkpoint_every={t.checkpoint_every} and train.max_to_keep={t.max_to_keep} must be >= 1"),
        (cfg.data.limit >= 0, f"data.limit={cfg.data.limit} must be >= 0 (0: every example)"),
        (t.heldout >= 0 and t.eval_every >= 0,
         f"train.heldout={t.heldout} and train.eval_every={t.eval_every} must be >= 0 (0: off)"),
        ((t.heldout > 0) == (t.eval_every > 0),
         f"train.heldout={t.heldout} and train.eval_every={t.eval_every}: set both (or neither) to log a held-out loss"),
        (1 <= t.micro_batch <= t.global_batch,
         f"train.micro_batch={t.micro_batch} must be in [1, global_batch={t.global_batch}]"),
        (cfg.data.max_seq_length >= 2, f"data.max_seq_length={cfg.data.max_seq_length} must be >= 2"),
        (1 <= cfg.data.bucket_min, f"data.bucket_min={cfg.data.bucket_min} must be >= 1"),
        (cfg.model.param_dtype in M.DTYPES and cfg.model.dtype in M.DTYPES,
         f"model dtypes {cfg.model.param_dtype!r}/{cfg.model.dtype!r}; expected {sorted(M.DTYPES)}"),
        (cfg.model.remat in memory.REMAT_POLICIES,
         f"model.remat={cfg.model.remat!r}; expected one of {tuple(memory.REMAT_POLICIES)}"),
        (cfg.model.loss_chunk >= 0, f"model.loss_chunk={cfg.model.loss_chunk} must be >= 0 (0: no chunking)"),
        # LoRA freezes the base weights (bfloat16 is fine there) and keeps its adapters in float32
        (cfg.lora.rank > 0 or not memory.precision_error(cfg.model), memory.precision_error(cfg.model)),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        lora.check(cfg.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# settings a resumed run may change: where and how it runs, not what it computes (up to reduction order)
OPERATIONAL = ("mesh.", "train.micro_batch", "train.checkpoint_every", "train.max_to_keep", "train.export_hf",
               "train.allow_config_change", "train.tensorboard")


def check_resume(out: Path, cfg: ConfigDict) -> None:
    """A folder is resumed only with the config it started with (operational settings aside; a setting its
    config.json predates counts as its default). Reads only, so it runs before the folder is touched."""
    saved = out / "config.json"
    if not saved.is_file():
        return
    try:
        before = cli.flat(ConfigDict(json.loads(saved.read_text())))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved} is damaged ({e}); restore it or move the run folder away") from None
    defaults = cli.flat(default_config())
    now = cli.flat(ConfigDict(json.loads(cfg.to_json_best_effort())))  # lists where the file has lists
    changed = sorted(k for k, v in now.items()
                     if before.get(k, defaults.get(k)) != v and k != "train.out_dir")  # a run folder may be moved
    numbers = [k for k in changed if not k.startswith(OPERATIONAL)]
    if numbers and not cfg.train.allow_config_change:
        raise ConfigError(f"{out} was started with a different config ({', '.join(numbers)}): resuming it would "
                          "match neither run; use another train.out_dir, or set train.allow_config_change=True")
    if changed:
        warnings.warn(f"{out} was started with a different config ({', '.join(changed)}): "
                      "resuming it will not reproduce an uninterrupted run", stacklevel=3)


def save_config(out: Path, cfg: ConfigDict) -> None:
    """The config a run folder was (re)started with, beside its checkpoints."""
    files.write_atomic(out / "config.json", cfg.to_json_best_effort(indent=2))
