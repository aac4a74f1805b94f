"""The paper's finetuning run: set up (config checks, data, mesh, weights or the newest checkpoint), the loop of
optimizer steps (`train_step.py`) with checkpoints and metrics, and the finish (HF export, loss plot).

Instruction, response and single-task tuning differ only in their data (`data.py`). Everything runs on
the device mesh of `cfg.mesh` (`sharding.py`): parameters, the accumulator and Adam's moments are sharded
by the rule table, micro-batch rows are split over the batch axes, and each process of a multi-host
run feeds only its own rows. The numbers do not depend on the mesh (up to float32 reduction order).

    python -m jax_implicit.train --config=configs/train/smollm2_cpu.py --config.optim.lr=1e-4
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jax_implicit import (batching, checkpoint, data, distributed, export, files, lora, memory, metrics, pinning,
                          pretrained, runlock)
from jax_implicit import model as M
from jax_implicit import train_step as S
from jax_implicit.plan import activation_bytes
from jax_implicit.sharding import Sharder
from jax_implicit.train_config import ConfigError, check_config, check_resume, save_config

log = logging.getLogger("jax_implicit.train")


class TrainingError(RuntimeError):
    """The run had to stop (a non-finite loss or update, not applied); the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    out_dir: Path
    hf_dir: Path | None
    metrics: Path
    plot: Path
    steps: int
    final_loss: float
    examples: int
    dropped: int
    state: dict = dataclasses.field(repr=False)  # the final train state, still on the mesh


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built before the first step compiles."""

    cfg: ConfigDict
    sh: Sharder
    writer: bool
    model_dir: Path
    tokenizer: Any
    examples: data.Examples
    train_ids: np.ndarray  # the examples trained on (all but the held-out ones)
    heldout_ids: np.ndarray
    sizes: tuple[int, ...]  # bucket lengths of the micro-batches
    local: Any  # this process's rows of a micro-batch
    out: Path
    ckpts: checkpoint.Checkpoints
    graphdef: nnx.GraphDef
    state: dict
    frozen: dict  # LoRA: the frozen base weights; else empty
    meta: dict  # where the restored state stands: step, epoch, position
    logged: list[dict]  # the metric rows up to the restored step

    @property
    def per_epoch(self) -> int:
        return batching.steps_per_epoch(len(self.train_ids), self.cfg.train.global_batch)

    @property
    def total(self) -> int:
        return self.per_epoch * self.cfg.train.epochs


def run(cfg: ConfigDict, devices: list[jax.Device] | None = None) -> RunResult:
    """Train as `cfg` says, resuming from the newest checkpoint in `cfg.train.out_dir` if there is one.

    Every process of a multi-host run calls this; the mesh spans `devices` (default: all, of every
    process). Process 0 alone writes config.json, metrics, the loss plot and logs; checkpoints and
    the HF export are collective (orbax and `export.to_hf` coordinate the processes). The writer
    holds `train.out_dir`'s lock from before anything is written there until the run ends.
    """
    with contextlib.ExitStack() as held:
        r = setup(cfg, devices, held)
        state, loss = loop(r)
        return finish(r, state, loss)


def _config_error(fn: Callable, *args, **kw):
    """`fn(*args, **kw)` with a ValueError or missing file reported as the config's problem."""
    try:
        return fn(*args, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def setup(cfg: ConfigDict, devices: list[jax.Device] | None, held: contextlib.ExitStack) -> Run:
    """Checks, data, mesh and state. Everything that can be wrong with the config, the data or the run folder
    is found before the folder is created or anything compiles."""
    if not jax.distributed.is_initialized():
        distributed.initialize()
    writer = distributed.is_writer()
    check_config(cfg)
    sh = _config_error(Sharder.from_config, cfg.mesh, devices)
    held.enter_context(pinning.active(sh))  # the model pins its activations to this mesh for the whole run
    t, d = cfg.train, cfg.data
    rows = data.load_rows(d)
    model_dir, tokenizer = _config_error(pretrained.locate, cfg.model)
    model_cfg = M.from_hf_config(model_dir, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype).replace(
        **memory.options(cfg.model))
    _config_error(lora.check_model, model_cfg, cfg.lora)
    if d.max_seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={d.max_seq_length} exceeds the context of {model_dir} "
                          f"({model_cfg.max_position_embeddings} positions)")
    examples = data.tokenize(rows, tokenizer, d.tag_set, d.max_seq_length, d.name, model_cfg.vocab_size,
                             d.path or d.name, d.chat_format)
    train_ids, heldout_ids = _split_heldout(len(examples.ids), t.heldout, t.seed)
    out = Path(t.out_dir).absolute()
    if writer:
        held.enter_context(runlock.hold(out / ".lock", f"training folder {out}"))
    check_resume(out, cfg)  # a damaged config.json or metrics file stops the run before anything is written
    logged = _config_error(metrics.read, out / "metrics.jsonl")
    if writer:
        files.remove_stale_tmp(out / "hf")  # of a killed export
        save_config(out, cfg)

    sizes = batching.sizes(d.bucket_min, d.max_seq_length)
    batch_sh = sh.rows((t.micro_batch, sizes[0]))  # the same split for every bucket length
    optimizer = S.make_optimizer(cfg.optim, batching.steps_per_epoch(len(train_ids), t.global_batch) * t.epochs)
    ckpts = checkpoint.Checkpoints(out / "checkpoints", t.checkpoint_every, t.max_to_keep)
    held.callback(ckpts.close)
    graphdef = nnx.split(lora.abstract(model_cfg, cfg.lora))[0]
    abstract, frozen_abstract = S.abstract_state(model_cfg, optimizer, t.seed, sh, cfg.lora)
    state_sh, frozen_sh = (jax.tree.map(lambda s: s.sharding, a) for a in (abstract, frozen_abstract))
    restored = ckpts.restore_latest(abstract)  # orbax reads each array straight into its shards
    params, frozen = (_load_weights(cfg, model_dir, sh, state_sh, frozen_sh) if restored is None or cfg.lora.rank
                      else (None, {}))
    if restored is None:
        init = jax.jit(lambda p: S.init_state(p, optimizer, t.seed), out_shardings=state_sh, donate_argnums=0)
        state, meta = init(params), dict(step=0, epoch=0, position=0)
    else:
        state, meta = restored
    r = Run(cfg, sh, writer, model_dir, tokenizer, examples, train_ids, heldout_ids, sizes,
            distributed.local_rows(batch_sh, (t.micro_batch, sizes[0])), out, ckpts, graphdef, state, frozen, meta,
            [row for row in logged if row["step"] <= meta["step"]])
    _describe(r, model_cfg, restored is not None)
    return r


def _split_heldout(n: int, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids): `heldout` examples chosen by the seed, the rest trained on, in order."""
    if heldout >= n:
        raise ConfigError(f"train.heldout={heldout} leaves no example to train on (the data has {n})")
    chosen = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:heldout])
    return np.setdiff1d(np.arange(n), chosen), chosen


def _describe(r: Run, model_cfg: M.ModelConfig, resumed: bool) -> None:
    if not r.writer:
        return
    t, d = r.cfg.train, r.cfg.data
    log.info("%s (%s mode): %d examples (%d held out), %d dropped with no response token left after truncation "
             "to %d tokens", d.name, d.mode, len(r.examples.ids), len(r.heldout_ids), r.examples.dropped,
             d.max_seq_length)
    log.info("mesh %s (rules %s) over %d devices in %d processes; %d steps (%d per epoch) of %d examples in "
             "micro-batches of %d; the longest micro-batch keeps ~%.2f GiB of activations per device",
             " ".join(f"{a}={k}" for a, k in r.sh.mesh.shape.items()), r.cfg.mesh.rules, r.sh.mesh.size,
             jax.process_count(), r.total, r.per_epoch, t.global_batch, t.micro_batch,
             activation_bytes(model_cfg, r.sh, t.micro_batch, r.sizes[-1]) / 2**30)
    if resumed:
        m = r.meta
        log.info("resuming from step %d (epoch %d, batch %d) in %s", m["step"], m["epoch"], m["position"], r.out)


def _load_weights(cfg: ConfigDict, model_dir: Path, sh: Sharder, state_sh: Any, frozen_sh: Any) -> tuple[dict, dict]:
    """(trainable, frozen) weights: HF weights read straight into their shards; with LoRA, adapters added
    (seeded by `train.seed`) and the base quantised if asked, then both parts placed on the mesh."""
    decoder = pretrained.load(cfg.model, sh, model_dir)
    if cfg.lora.rank == 0:
        return nnx.to_pure_dict(nnx.state(decoder)), {}
    _, trainable, frozen = lora.split(lora.apply(decoder, cfg.lora, cfg.train.seed))
    return jax.device_put(trainable, state_sh["params"]), jax.device_put(frozen, frozen_sh)


def _dropout_seed(cfg: ConfigDict, step: int, micro: int, rows: int) -> dict:
    """The LoRA dropout seed of one micro-batch (a function of seed, step and micro-batch, so resumes repeat it),
    one copy per row so that it splits over the batch axes like the rows."""
    if cfg.lora.rank == 0 or cfg.lora.dropout == 0:
        return {}
    seed = int(np.random.SeedSequence([cfg.train.seed, step, micro]).generate_state(1)[0] >> 1)
    return dict(dropout_seed=np.full((rows, 1), seed, np.int32))


def _global_micro_batches(r: Run, ids: np.ndarray, step: int) -> tuple[list[jax.Array], list[dict]]:
    """The micro-batches of the examples `ids` with their exact loss weights, as this process's rows of
    global arrays on the mesh; and the host micro-batches they came from."""
    t = r.cfg.train
    micros = batching.micro_batches(r.examples, ids, t.micro_batch, r.sizes)
    out = []
    for k, (b, w) in enumerate(zip(micros, S.loss_weights(micros, t.reduction))):
        mine = dict(tokens=b["tokens"][r.local], mask=b["mask"][r.local], weights=w[r.local])
        mine |= _dropout_seed(r.cfg, step, k, len(mine["tokens"]))
        out.append(r.sh.global_batch(mine, t.micro_batch))
    return out, micros


def loop(r: Run) -> tuple[dict, float]:
    """Optimizer steps from the restored position to the end: each logged, checkpointed as configured, and
    never applied when its update is not finite. Returns the final state and the last training loss."""
    from tqdm.auto import tqdm

    cfg, t = r.cfg, r.cfg.train
    optimizer = S.make_optimizer(cfg.optim, r.total)
    state_sh = jax.tree.map(lambda a: a.sharding, r.state)
    batch_sh = r.sh.rows((t.micro_batch, r.sizes[0]))
    frozen_sh = jax.tree.map(lambda a: a.sharding, r.frozen)
    micro_step, apply_step = S.build_steps(r.graphdef, optimizer, state_sh, batch_sh, frozen_sh)
    eval_step = S.build_eval(r.graphdef) if t.eval_every else None
    schedule = S.lr_schedule(cfg.optim, r.total)
    state, step, skipped = r.state, r.meta["step"], 0
    loss = r.logged[-1]["loss"] if r.logged else float("nan")
    accum = S.zeros_accum(state["params"])
    key = np.asarray(state["rng"])
    bar = tqdm(total=r.total, initial=step, desc=f"train {cfg.data.name}/{cfg.data.mode}", unit="step",
               dynamic_ncols=True, disable=not r.writer)
    log_ = metrics.Log(r.out, r.logged, tensorboard=t.tensorboard) if r.writer else None
    try:
        for epoch in range(r.meta["epoch"], t.epochs):
            order = r.train_ids[batching.epoch_order(len(r.train_ids), key, epoch)]
            for position in range(r.meta["position"] if epoch == r.meta["epoch"] else 0, r.per_epoch):
                start = time.perf_counter()
                batch_ids = order[position * t.global_batch:(position + 1) * t.global_batch]
                batches, micros = _global_micro_batches(r, batch_ids, step)
                losses = []
                for batch in batches:
                    accum, part = micro_step(state["params"], accum, batch, r.frozen)
                    losses.append(part)
                loss = float(np.sum(np.asarray(jax.device_get(losses), np.float64)))
                lr = float(schedule(step))
                state, accum, applied, grad_norm = apply_step(state, accum)
                if not bool(applied):
                    skipped += 1
                    _not_applied(r, loss, step, epoch, position, batch_ids, skipped)
                step += 1
                tokens = int(sum(b["mask"].sum() for b in micros))
                seconds = time.perf_counter() - start
                row = dict(step=step, epoch=epoch, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                           loss_tokens=int(sum(b["loss"][:, 1:].sum() for b in micros)),
                           seconds=round(seconds, 4), tokens_per_s=round(tokens / seconds, 1))
                if eval_step is not None and (step % t.eval_every == 0 or step == r.total):
                    row["heldout_loss"] = _heldout_loss(r, eval_step, state["params"])
                if not bool(applied):
                    row["skipped"] = True
                if log_ is not None:
                    log_.write(row)
                r.logged.append(row)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
                last = position + 1 == r.per_epoch
                where = dict(step=step, epoch=epoch + last, position=0 if last else position + 1)
                r.ckpts.save(step, state, where, force=last)
    finally:
        bar.close()
        r.ckpts.close()
        if log_ is not None:
            log_.close()
    return state, loss


def _not_applied(r: Run, loss: float, step: int, epoch: int, position: int, batch_ids: np.ndarray,
                 skipped: int) -> None:
    what = f"loss ({loss})" if not math.isfinite(loss) else "update"
    cause = (f"non-finite {what} at step {step + 1} (epoch {epoch}, batch {position}, "
             f"examples {', '.join(r.examples.names[i] for i in batch_ids)})")
    if r.cfg.train.nonfinite == "stop":
        raise TrainingError(f"{cause}; stopped without updating. Last good checkpoint: "
                            f"step {r.ckpts.latest_step()} in {r.ckpts.directory}")
    warnings.warn(f"{cause}; skipped, the state kept as it was ({skipped} skipped so far)", stacklevel=2)


def _heldout_loss(r: Run, eval_step: Callable, params: dict) -> float:
    """The loss of the held-out examples, reduced like the training loss (exactly, over all of them)."""
    batches, _ = _global_micro_batches(r, r.heldout_ids, 0)
    return float(np.sum(np.asarray(jax.device_get([eval_step(params, b, r.frozen) for b in batches]), np.float64)))


def finish(r: Run, state: dict, loss: float) -> RunResult:
    """The HF export (every process gathers; process 0 writes) and the loss plot."""
    hf_dir = export.to_hf(r.cfg, state["params"], r.out, r.model_dir, r.tokenizer, r.sh) if r.cfg.train.export_hf \
        else None
    plot = r.out / "loss.png"
    if r.writer:
        metrics.plot_loss(r.logged, plot)
    return RunResult(r.out, hf_dir, r.out / "metrics.jsonl", plot, r.logged[-1]["step"] if r.logged else 0, loss,
                     len(r.train_ids), r.examples.dropped, state)


def summary(result: RunResult) -> dict:
    """What a finished run prints: its paths and final numbers."""
    return {f.name: str(getattr(result, f.name)) for f in dataclasses.fields(result) if f.name != "state"}


if __name__ == "__main__":
    from absl import logging as absl_logging

    from jax_implicit import cli

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    log.setLevel(logging.INFO)
    cli.main(lambda cfg: summary(run(cfg)), None, errors=(TrainingError, checkpoint.CheckpointError),
             check=check_config)
