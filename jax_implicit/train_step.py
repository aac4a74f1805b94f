"""One optimizer step: jitted micro-steps that add a fixed-shape micro-batch's gradient into a float32
accumulator, then one guarded Adam update (the update tested, then applied in place). Also the loss, its
exact per-token weights, the learning-rate curves and the train state's abstract shapes and shardings (what
the planner and the AOT compile check reuse).

Per-token loss weights are computed on the host from the whole global batch, so both reductions are
exact however the batch is split: `example` (each example's mean token loss, averaged over examples:
the authors' code) and `token` (the mean over every loss token of the global batch).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from jax_implicit import checkpoint, lora, memory
from jax_implicit import model as M
from jax_implicit.sharding import Sharder


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


def loss_sum(params: dict, graphdef: nnx.GraphDef, batch: dict) -> jax.Array:
    """Sum over target tokens of weight * cross-entropy; token t is predicted from position t - 1.

    The head is applied `cfg.loss_chunk` tokens at a time (`memory.cross_entropy_sum`)."""
    model = nnx.merge(graphdef, params)
    tokens, mask = batch["tokens"], batch["mask"]
    key = jax.random.PRNGKey(batch["dropout_seed"][0, 0]) if "dropout_seed" in batch else None  # LoRA dropout
    hidden, _ = model.hidden(tokens, M.positions_from_mask(mask), mask, dropout_key=key)
    targets = jnp.roll(tokens, -1, axis=1)  # the wrapped-around last target has weight 0
    weights = jnp.pad(batch["weights"][:, 1:], ((0, 0), (0, 1)))
    return memory.cross_entropy_sum(hidden, model.head()[...], targets, weights, model.cfg.loss_chunk)


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
    """A jitted micro-step and the guarded update of an optimizer step; all arrays are arguments, buffers are
    donated.

    micro_step(params, accum, batch, frozen) -> (accum + grad, loss): one micro-batch, float32 accumulator;
    `frozen` (LoRA: the base weights) joins `params` in the forward and gets no gradient.
    apply_step(state, accum) -> (state, zeroed accum, applied, grad_norm): the Adam update, guarded: when any
    value of the updated state would not be finite, the old state is kept and `applied` is False.
    The guard is its own program, run first: it computes the update only to test it. Then the update runs in
    place, and the accumulator is zeroed in place by a program of its own (zeroing it in the update made XLA
    copy the gradient first). Testing the updated state and selecting between it and the old one in one
    program held both states (SmolLM2-135M, float32: 2.0 GB of XLA temporaries, against 0.94 GB for the
    test and none for the update) and took 1.35-1.50 s on 2 CPU cores, against 0.89-0.97 s.
    With the train state's shardings (`abstract_state`) and the micro-batch's, every input and output
    is pinned to the mesh (the accumulator is sharded like the parameters); without, jit follows its
    arguments.
    """
    def micro(params, accum, batch, frozen={}):  # noqa: B006 -- never mutated
        loss, grads = jax.value_and_grad(lambda p: loss_sum(lora.combine(frozen, p), graphdef, batch))(params)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), accum, grads), loss

    def updated(state, accum):
        params = state["params"]
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), accum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        return dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state)

    zeros = lambda accum: jax.tree.map(jnp.zeros_like, accum)
    kw = {}
    if state_sh is not None:
        p_sh, scalar = state_sh["params"], jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
        kw = dict(micro=dict(in_shardings=(p_sh, p_sh, batch_sh, frozen_sh or {}), out_shardings=(p_sh, scalar)),
                  check=dict(in_shardings=(state_sh, p_sh), out_shardings=(scalar, scalar)),
                  update=dict(in_shardings=(state_sh, p_sh), out_shardings=state_sh),
                  reset=dict(in_shardings=(p_sh,), out_shardings=p_sh))
    check = jax.jit(lambda state, accum: (checkpoint.all_finite(updated(state, accum)), optax.tree.norm(accum)),
                    **kw.get("check", {}))
    update = jax.jit(updated, donate_argnums=0, **kw.get("update", {}))
    reset = jax.jit(zeros, donate_argnums=0, keep_unused=True, **kw.get("reset", {}))  # kept: zeroed in place

    def apply(state, accum):
        applied, grad_norm = check(state, accum)
        if bool(applied):
            state = update(state, accum)
        return state, reset(accum), applied, grad_norm

    return jax.jit(micro, donate_argnums=(1,), **kw.get("micro", {})), apply


def build_eval(graphdef: nnx.GraphDef) -> Callable:
    """eval_step(params, batch, frozen) -> the weighted loss sum of one micro-batch, without gradients."""
    return jax.jit(lambda params, batch, frozen: loss_sum(lora.combine(frozen, params), graphdef, batch))


def zeros_accum(params: dict) -> dict:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32, device=p.sharding), params)
