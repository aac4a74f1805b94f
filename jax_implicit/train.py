"""The paper's finetuning loop: masked cross-entropy, Adam with warmup and decay, gradient accumulation
to an exact global batch, orbax checkpoints with exact resume, HF export at the end.

Instruction, response and single-task tuning differ only in their data (`data.py`). One optimizer step
is a run of jitted micro-steps, each adding one fixed-shape micro-batch's gradient into a float32
accumulator, then one jitted update. Per-token loss weights are computed on the host from the whole
global batch, so both reductions are exact however the batch is split:
`example` (each example's mean token loss, averaged over examples: the authors' code) and `token`
(the mean over every loss token of the global batch).

Everything runs on the device mesh of `cfg.mesh` (`sharding.py`): parameters, the accumulator and
Adam's moments are sharded by the rule table, micro-batch rows are split over the batch axes, and
each process of a multi-host run feeds only its own rows. The numbers do not depend on the mesh
(up to float32 reduction order).

    python -m jax_implicit.train --config=configs/train/smollm2_cpu.py --config.optim.lr=1e-4
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from jax_implicit import checkpoint, cli, config, convert, data, distributed, files, lora, memory, pretrained, prompts, runlock
from jax_implicit import model as M
from jax_implicit.plan import activation_bytes
from jax_implicit.sharding import Sharder

log = logging.getLogger("jax_implicit.train")
REDUCTIONS = ("example", "token")
NONFINITE = ("stop", "skip")  # what a step whose update is not finite does (it is never applied)
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config that cannot run, reported before anything loads or compiles."""


class TrainingError(RuntimeError):
    """The run had to stop (a non-finite loss or update, not applied); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- config


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
                 allow_config_change: bool = False) -> ConfigDict:
    """`nonfinite`: a step whose loss or update is not finite is never applied; "stop" ends the run there,
    "skip" leaves the state as it was, counts it and goes on with the next batch. `allow_config_change`:
    resume a run folder even though settings that change the numbers differ from the ones it started with."""
    return ConfigDict(dict(epochs=epochs, global_batch=global_batch, micro_batch=micro_batch, reduction=reduction,
                           seed=seed, out_dir=out_dir, checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                           export_hf=export_hf, nonfinite=nonfinite, allow_config_change=allow_config_change))


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
        raise ConfigError(f"config lacks keys {missing} (start from train.default_config())")
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


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(optim: ConfigDict, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """transformers' `get_scheduler` curves: warmup over int(ratio * steps) steps, then cosine or linear to 0."""
    warmup = int(total_steps * optim.warmup_ratio)
    decay = max(1, total_steps - warmup)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = (count - warmup) / decay
        after = {"cosine": 0.5 * (1 + jnp.cos(jnp.pi * progress)), "linear": (total_steps - count) / decay,
                 "constant": jnp.ones_like(count)}[optim.schedule]
        factor = jnp.where(count < warmup, count / max(1, warmup), jnp.maximum(0.0, after))
        return optim.lr * factor

    return schedule


def make_optimizer(optim: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    adam = optax.adam(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps)
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adam) if optim.clip_norm > 0 else adam


# ----------------------------------------------------------------------------- the step


def loss_sum(params: dict, graphdef: nnx.GraphDef, batch: dict) -> jax.Array:
    """Sum over target tokens of weight * cross-entropy; token t is predicted from position t - 1.

    The head is applied `cfg.loss_chunk` tokens at a time (`memory.cross_entropy_sum`)."""
    model = nnx.merge(graphdef, params)
    tokens, mask = batch["tokens"], batch["mask"]
    key = jax.random.PRNGKey(batch["dropout_seed"][0, 0]) if "dropout_seed" in batch else None  # LoRA dropout
    hidden, _ = model.hidden(tokens, M.positions_from_mask(mask), mask, dropout_key=key)
    targets = jnp.roll(tokens, -1, axis=1)  # the wrapped-around last target has weight 0
    weights = jnp.pad(batch["weights"][:, 1:], ((0, 0), (0, 1)))
    return memory.cross_entropy_sum(hidden, model.head()[...], targets, weights, model.cfg.loss_chunk,
                                    model.activation_sharding or (lambda a, _: a))


def loss_weights(micro_batches: list[dict], reduction: str) -> list[np.ndarray]:
    """Per-token weights for a whole global batch, so that the summed weighted loss is its exact mean."""
    counts = [b["loss"][:, 1:].sum(axis=1) for b in micro_batches]  # loss tokens per row
    if reduction == "token":
        total = sum(int(c.sum()) for c in counts)
        per_row = [np.full(len(c), 1.0 / total) for c in counts]
    else:
        examples = sum(int((c > 0).sum()) for c in counts)
        per_row = [np.where(c > 0, 1.0 / (np.maximum(c, 1) * examples), 0.0) for c in counts]
    out = []
    for b, w in zip(micro_batches, per_row):
        weights = b["loss"].astype(np.float32) * w[:, None].astype(np.float32)
        weights[:, 0] = 0.0
        out.append(weights)
    return out


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """The train state: params, optimizer state and the PRNG key the data order derives from."""
    return dict(params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def abstract_state(model_cfg: M.ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                   sh: Sharder, lora_cfg: ConfigDict | None = None) -> tuple[Any, Any]:
    """The train state's and the frozen weights' shapes, dtypes and shardings, without allocating them.

    Parameters by their logical axes; Adam's moments mirror them (`Sharder.tree` matches paths by
    suffix); the step count and the PRNG key are replicated. With LoRA (`lora_cfg.rank` > 0) the state
    holds only the adapters (so do checkpoints) and the base weights are the frozen part; else it is empty.
    """
    decoder = lora.abstract(model_cfg, lora_cfg) if lora_cfg is not None else M.abstract(model_cfg)
    _, trainable, frozen = lora.split(decoder)
    if not trainable:  # full finetuning
        trainable, frozen = nnx.to_pure_dict(nnx.state(decoder)), {}
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer, seed), trainable)
    axes = M.logical_axes(decoder)
    with_sharding = lambda tree: jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                                              tree, sh.tree(tree, axes))
    return with_sharding(shapes), with_sharding(frozen)


def build_steps(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, state_sh: Any = None,
                batch_sh: jax.sharding.NamedSharding | None = None, frozen_sh: Any = None) -> tuple[Callable, Callable]:
    """The two jitted functions of an optimizer step; all arrays are arguments, buffers are donated.

    micro_step(params, accum, batch, frozen) -> (accum + grad, loss): one micro-batch, float32 accumulator;
    `frozen` (LoRA: the base weights) joins `params` in the forward and gets no gradient.
    apply_step(state, accum) -> (state, zeroed accum, applied): the Adam update, guarded on the device:
    when any value of the updated state is not finite the old state is returned and `applied` is False.
    With the train state's shardings (`abstract_state`) and the micro-batch's, every input and output
    is pinned to the mesh (the accumulator is sharded like the parameters); without, jit follows its
    arguments.
    """
    def micro(params, accum, batch, frozen={}):  # noqa: B006 -- never mutated
        loss, grads = jax.value_and_grad(lambda p: loss_sum(lora.combine(frozen, p), graphdef, batch))(params)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), accum, grads), loss

    def apply(state, accum):
        params = state["params"]
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), accum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state)
        applied = checkpoint.all_finite(new)
        state = jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, state)
        return state, jax.tree.map(jnp.zeros_like, accum), applied

    micro_kw, apply_kw = {}, {}
    if state_sh is not None:
        p_sh, scalar = state_sh["params"], jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
        micro_kw = dict(in_shardings=(p_sh, p_sh, batch_sh, frozen_sh or {}), out_shardings=(p_sh, scalar))
        apply_kw = dict(in_shardings=(state_sh, p_sh), out_shardings=(state_sh, p_sh, scalar))
    return jax.jit(micro, donate_argnums=(1,), **micro_kw), jax.jit(apply, donate_argnums=(0, 1), **apply_kw)


def zeros_accum(params: dict) -> dict:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32, device=p.sharding), params)


# ----------------------------------------------------------------------------- the run


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


def _read_metrics(path: Path) -> list[dict]:
    """The metric lines a run folder holds (a killed run may have logged past its last checkpoint, and
    its last line may be cut short)."""
    rows, lines = [], path.read_text(errors="replace").splitlines() if path.is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            if n == len(lines):  # a line cut short by a kill
                continue
            raise ConfigError(f"{path} line {n} is damaged; repair or delete that line to resume") from None
        rows.append(row)
    return rows


def plot_loss(rows: list[dict], out: Path) -> Path:
    fig, ax = files.figure((6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    return files.save_figure(fig, out)


# settings a resumed run may change: where and how it runs, not what it computes (up to reduction order)
OPERATIONAL = ("mesh.", "train.micro_batch", "train.checkpoint_every", "train.max_to_keep", "train.export_hf",
               "train.allow_config_change")


def _resume_config(out: Path, cfg: ConfigDict) -> None:
    """A folder is resumed only with the config it started with (operational settings aside)."""
    saved = out / "config.json"
    now = json.loads(cfg.to_json_best_effort())
    if saved.is_file():
        try:
            before = cli.flat(ConfigDict(json.loads(saved.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{saved} is damaged ({e}); restore it or move the run folder away") from None
        changed = sorted(k for k, v in cli.flat(ConfigDict(now)).items()
                         if before.get(k) != v and k != "train.out_dir")  # a run folder may be moved
        numbers = [k for k in changed if not k.startswith(OPERATIONAL)]
        if numbers and not cfg.train.allow_config_change:
            raise ConfigError(f"{out} was started with a different config ({', '.join(numbers)}): resuming it would "
                              "match neither run; use another train.out_dir, or set train.allow_config_change=True")
        if changed:
            warnings.warn(f"{out} was started with a different config ({', '.join(changed)}): "
                          "resuming it will not reproduce an uninterrupted run", stacklevel=3)
    files.write_atomic(saved, json.dumps(now, indent=2))


def _sharder(mesh_cfg: ConfigDict, devices: list[jax.Device] | None) -> Sharder:
    try:
        return Sharder.from_config(mesh_cfg, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _load_weights(cfg: ConfigDict, model_dir: Path, sh: Sharder, state_sh: Any, frozen_sh: Any) -> tuple[dict, dict]:
    """(trainable, frozen) weights: HF weights read straight into their shards; with LoRA, adapters added
    (seeded by `train.seed`) and the base quantised if asked, then both parts placed on the mesh."""
    decoder = sh.load_hf(model_dir, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
    if cfg.lora.rank == 0:
        return nnx.to_pure_dict(nnx.state(decoder)), {}
    _, trainable, frozen = lora.split(lora.apply(decoder, cfg.lora, cfg.train.seed))
    return jax.device_put(trainable, state_sh["params"]), jax.device_put(frozen, frozen_sh)


def _initial_state(cfg: ConfigDict, params: dict, optimizer: optax.GradientTransformation, state_sh: Any) -> dict:
    """Adam's moments created on the mesh beside the parameters."""
    init = jax.jit(lambda p: init_state(p, optimizer, cfg.train.seed), out_shardings=state_sh, donate_argnums=0)
    return init(params)


def _dropout_seed(cfg: ConfigDict, step: int, micro: int, rows: int) -> dict:
    """The LoRA dropout seed of one micro-batch (a function of seed, step and micro-batch, so resumes repeat it),
    one copy per row so that it splits over the batch axes like the rows."""
    if cfg.lora.rank == 0 or cfg.lora.dropout == 0:
        return {}
    seed = int(np.random.SeedSequence([cfg.train.seed, step, micro]).generate_state(1)[0] >> 1)
    return dict(dropout_seed=np.full((rows, 1), seed, np.int32))


def run(cfg: ConfigDict, devices: list[jax.Device] | None = None) -> RunResult:
    """Train as `cfg` says, resuming from the newest checkpoint in `cfg.train.out_dir` if there is one.

    Every process of a multi-host run calls this; the mesh spans `devices` (default: all, of every
    process). Process 0 alone writes config.json, metrics, the loss plot and logs; checkpoints and
    the HF export are collective (orbax and `convert.export_hf` coordinate the processes). The writer
    holds `train.out_dir`'s lock from before anything is written there until the run ends.
    """
    with contextlib.ExitStack() as held:
        return _run(cfg, devices, held)


def _run(cfg: ConfigDict, devices: list[jax.Device] | None, held: contextlib.ExitStack) -> RunResult:
    if not jax.distributed.is_initialized():
        distributed.initialize()
    writer = distributed.is_writer()
    info = log.info if writer else (lambda *_: None)
    check_config(cfg)
    sh = _sharder(cfg.mesh, devices)
    t, d = cfg.train, cfg.data
    rows = data.load_rows(d)
    try:
        model_dir = pretrained.model_dir(cfg.model.path)
        tokenizer = pretrained.load_tokenizer(cfg.model.tokenizer or model_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    model_cfg = M.from_hf_config(model_dir, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype).replace(
        **memory.options(cfg.model))
    try:
        lora.check_model(model_cfg, cfg.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.max_seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={d.max_seq_length} exceeds the context of {model_dir} "
                          f"({model_cfg.max_position_embeddings} positions)")
    examples = data.tokenize(rows, tokenizer, d.tag_set, d.max_seq_length, d.name, model_cfg.vocab_size,
                             d.path or d.name, d.chat_format)
    n = len(examples.ids)
    info("%s (%s mode): %d examples, %d dropped with no response token left after truncation to %d tokens",
         d.name, d.mode, n, examples.dropped, d.max_seq_length)
    per_epoch = data.steps_per_epoch(n, t.global_batch)
    total = per_epoch * t.epochs
    optimizer = make_optimizer(cfg.optim, total)
    sizes = data.buckets(d.max_seq_length, d.bucket_min)
    batch_sh = sh.rows((t.micro_batch, sizes[0]))  # the same split for every bucket length
    local = distributed.local_rows(batch_sh, (t.micro_batch, sizes[0]))  # this process's rows of a micro-batch
    info("mesh %s (rules %s) over %d devices in %d processes; %d steps (%d per epoch) of %d examples in "
         "micro-batches of %d; the longest micro-batch keeps ~%.2f GiB of activations per device",
         " ".join(f"{a}={k}" for a, k in sh.mesh.shape.items()), cfg.mesh.rules, sh.mesh.size, jax.process_count(),
         total, per_epoch, t.global_batch, t.micro_batch,
         activation_bytes(model_cfg, sh, t.micro_batch, sizes[-1]) / 2**30)

    out = Path(t.out_dir).absolute()
    if writer:
        held.enter_context(runlock.hold(out / ".lock", f"training folder {out}"))
        files.remove_stale_tmp(out / "hf")  # of a killed export
        _resume_config(out, cfg)
    metrics_path = out / "metrics.jsonl"
    logged = _read_metrics(metrics_path)
    ckpts = checkpoint.Checkpoints(out / "checkpoints", t.checkpoint_every, t.max_to_keep)
    graphdef = nnx.split(sh.pin_activations(lora.abstract(model_cfg, cfg.lora)))[0]
    abstract, frozen_abstract = abstract_state(model_cfg, optimizer, t.seed, sh, cfg.lora)
    state_sh, frozen_sh = (jax.tree.map(lambda s: s.sharding, a) for a in (abstract, frozen_abstract))
    restored = ckpts.restore_latest(abstract)  # orbax reads each array straight into its shards
    params, frozen = (_load_weights(cfg, model_dir, sh, state_sh, frozen_sh) if restored is None or cfg.lora.rank
                      else (None, {}))
    if restored is None:
        state, meta = _initial_state(cfg, params, optimizer, state_sh), dict(step=0, epoch=0, position=0)
    else:
        state, meta = restored
        info("resuming from step %d (epoch %d, batch %d) in %s", meta["step"], meta["epoch"], meta["position"], out)
    del params
    micro_step, apply_step = build_steps(graphdef, optimizer, state_sh, batch_sh, frozen_sh)
    schedule = lr_schedule(cfg.optim, total)
    rows_logged = [r for r in logged if r["step"] <= meta["step"]]
    if writer:
        files.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows_logged))
    step, loss = meta["step"], rows_logged[-1]["loss"] if rows_logged else float("nan")

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=f"train {d.name}/{d.mode}", unit="step", dynamic_ncols=True,
               disable=not writer)
    accum = zeros_accum(state["params"])
    key = np.asarray(state["rng"])
    skipped = 0
    try:
        with open(metrics_path, "a") if writer else contextlib.nullcontext() as metrics_file:
            for epoch in range(meta["epoch"], t.epochs):
                order = data.epoch_order(n, key, epoch)
                for position in range(meta["position"] if epoch == meta["epoch"] else 0, per_epoch):
                    start = time.perf_counter()
                    batch_ids = order[position * t.global_batch:(position + 1) * t.global_batch]
                    micros = data.micro_batches(examples, batch_ids, t.micro_batch, sizes)
                    losses = []
                    for k, (b, w) in enumerate(zip(micros, loss_weights(micros, t.reduction))):
                        mine = dict(tokens=b["tokens"][local], mask=b["mask"][local], weights=w[local])
                        mine |= _dropout_seed(cfg, step, k, len(mine["tokens"]))
                        accum, part = micro_step(state["params"], accum, sh.global_batch(mine, t.micro_batch), frozen)
                        losses.append(part)
                    loss = float(np.sum(np.asarray(jax.device_get(losses), np.float64)))
                    lr = float(schedule(step))
                    state, accum, applied = apply_step(state, accum)
                    applied = bool(applied)
                    if not applied:
                        what = f"loss ({loss})" if not math.isfinite(loss) else "update"
                        cause = (f"non-finite {what} at step {step + 1} (epoch {epoch}, batch {position}, "
                                 f"examples {', '.join(examples.names[i] for i in batch_ids)})")
                        if t.nonfinite == "stop":
                            raise TrainingError(f"{cause}; stopped without updating. Last good checkpoint: "
                                                f"step {ckpts.latest_step()} in {ckpts.directory}")
                        skipped += 1
                        warnings.warn(f"{cause}; skipped, the state kept as it was ({skipped} skipped so far)",
                                      stacklevel=1)
                    step += 1
                    tokens = int(sum(b["mask"].sum() for b in micros))
                    seconds = time.perf_counter() - start
                    row = dict(step=step, epoch=epoch, loss=loss, lr=lr, tokens=tokens,
                               loss_tokens=int(sum(b["loss"][:, 1:].sum() for b in micros)),
                               seconds=round(seconds, 4), tokens_per_s=round(tokens / seconds, 1))
                    if not applied:
                        row["skipped"] = True
                    if writer:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    rows_logged.append(row)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                    bar.update(1)
                    last = position + 1 == per_epoch
                    where = dict(step=step, epoch=epoch + last, position=0 if last else position + 1)
                    ckpts.save(step, state, where, force=last)
    finally:
        bar.close()
        ckpts.close()
    hf_dir = None
    if t.export_hf:  # every process gathers; process 0 writes
        tok_dir = Path(cfg.model.tokenizer or model_dir)
        if writer and not tok_dir.is_dir():
            tok_dir = Path(tokenizer.save_pretrained(out / "tokenizer")[0]).parent
        if cfg.lora.rank:  # RT merges the adapter into the unquantised base weights
            base = sh.load_hf(model_dir, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
            final = lora.with_adapters(base, cfg.lora, state["params"])
            lora.export_peft(final, cfg.lora, out / "adapter", base_model=str(cfg.model.path))
            final = lora.merged(final)
        else:
            final = nnx.merge(graphdef, state["params"])
        hf_dir = convert.export_hf(final, out / "hf", tokenizer_dir=tok_dir if writer else None,
                                   chat_template=prompts.chat_template(d.tag_set, d.chat_format))
    plot = plot_loss(rows_logged, out / "loss.png") if writer else out / "loss.png"
    return RunResult(out, hf_dir, metrics_path, plot, step, loss, n, examples.dropped, state)


# ----------------------------------------------------------------------------- command line


def summary(result: RunResult) -> dict:
    """What a finished run prints: its paths and final numbers."""
    return {f.name: str(getattr(result, f.name)) for f in dataclasses.fields(result) if f.name != "state"}


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    log.setLevel(logging.INFO)
    cli.main(lambda cfg: summary(run(cfg)), None, errors=(TrainingError, checkpoint.CheckpointError),
             check=check_config)
