"""Batched decoding in one compiled program: prefill, then a `lax.while_loop` over a fixed-size,
donated KV cache that stops once every row has produced EOS or `max_new_tokens` tokens. The
rule-based adapter (`rules.py`) is applied to the logits inside the same step, so there is no
host round trip per token.

`generate` works on token arrays (left-padded prompts); `_serve` is continuous batching, whose host side
(formatting, tokenizing, grouping and detokenizing instructions) is `serving.py`. Every array reaches the
jitted functions as an argument (nothing is closed over) so a caller may place the decoder, cache and
batch on a device mesh beforehand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_implicit import model as M
from jax_implicit import pinning
from jax_implicit import rules as R


def _pick(scores: jax.Array, step: jax.Array, temperature: jax.Array, top_p: jax.Array,
          key: jax.Array | None) -> jax.Array:
    """Greedy argmax when `key` is None, else a temperature / nucleus sample keyed by the step."""
    if key is None:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    logits = scores / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest prefix reaching top_p; never empty
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(jax.random.fold_in(key, step), logits).astype(jnp.int32)


def _scores(logits: jax.Array, n: jax.Array, seen: jax.Array | None, tables: R.RuleTables | None) -> jax.Array:
    """The decoding distribution (B, V) as log-probabilities: the model's, times the rules' after `n`
    response tokens (a scalar, or (B, 1) per row) when there are rules."""
    scores = jax.nn.log_softmax(logits, axis=-1)
    if tables is not None:
        scores = scores + jax.nn.log_softmax(R.scores(tables, n, seen), axis=-1)
    return scores


def _prefill(decoder: M.Decoder, cache: M.KVCache, ids: jax.Array, positions: jax.Array,
             mask: jax.Array) -> M.KVCache:
    """Prefill all but the last token of the left-padded prompts `ids` (B, W) into the empty `cache` (their
    logits are unused, so XLA drops the head); the next write goes to slot W - 1. The prompts go through a
    fresh cache of W - 1 slots that is then copied in: writing into the large cache directly made XLA copy
    all of it at every layer (it fused one layer's write with that layer's read)."""
    n, width = ids.shape
    small = M.KVCache.init(decoder.cfg, n, width - 1)
    if width > 1:
        small = decoder.hidden(ids[:, :-1], positions[:, :-1], mask[:, :-1], small)[1]
    return _grow(small, cache)


def _prefill_one(decoder: M.Decoder, slots: int, ids: jax.Array, positions: jax.Array, mask: jax.Array,
                 width: jax.Array | int, chunk: int) -> M.KVCache:
    """A one-row cache of `slots` slots holding the `width` columns (a multiple of `chunk`; may be traced)
    before the last token of the left-padded row `ids` (1, W > width), prefilled `chunk` tokens at a time: one
    compiled body serves prompts of every width. Chunks of padding alone are skipped: their slots stay
    invalid, as prefilling them would leave them. The row's next write goes to slot `width`."""
    start = ids.shape[1] - 1 - width
    skip = (width - (jnp.sum(mask, dtype=jnp.int32) - 1)) // chunk
    one = dataclasses.replace(M.KVCache.init(decoder.cfg, 1, slots), index=skip * chunk)

    def take(j, one):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start + j * chunk, chunk, axis=1)
        return decoder.hidden(cut(ids), cut(positions), cut(mask), one)[1]

    return jax.lax.fori_loop(skip, width // chunk, take, one)


def _put_row(cache: M.KVCache, r: jax.Array, one: M.KVCache) -> M.KVCache:
    """The one-row cache `one` written over row `r` of `cache` (its index kept)."""
    put = lambda big, new: jax.lax.dynamic_update_slice(big, new, (r,) + (0,) * (big.ndim - 1))
    return M.KVCache(tuple(map(put, cache.k, one.k)), tuple(map(put, cache.v, one.v)), put(cache.valid, one.valid),
                     cache.index)


def _prefill_row(decoder: M.Decoder, cache: M.KVCache, r: jax.Array, ids: jax.Array, positions: jax.Array,
                 mask: jax.Array, width: jax.Array, chunk: int) -> M.KVCache:
    """Continuous batching: `_prefill_one` into row `r` of the per-row `cache`, whose next write there goes
    to slot `width`."""
    one = _prefill_one(decoder, cache.slots, ids, positions, mask, width, chunk)
    return dataclasses.replace(_put_row(cache, r, one), index=cache.index.at[r].set(width))


# Tokens per chunk when `generate` prefills one row at a time (`_row_chunk`).
PREFILL_CHUNK = 64


def _prefill_rows(decoder: M.Decoder, cache: M.KVCache, ids: jax.Array, positions: jax.Array,
                  mask: jax.Array, chunk: int) -> M.KVCache:
    """`_prefill`, one row at a time (`_prefill_one`), so that a row's chunks of padding are skipped: the
    prompts are left-padded to the longest, and a batch of mixed lengths is mostly padding (the first 16
    validation prompts: 739 real tokens in 16 x 257). The prompts are first padded on the left to a whole
    number of chunks; those extra slots hold padding alone and are dropped."""
    n, width = ids.shape
    extra = -(width - 1) % chunk
    ids, positions, mask = (jnp.pad(a, ((0, 0), (extra, 0))) for a in (ids, positions, mask))
    rows = M.KVCache.init(decoder.cfg, n, extra + width - 1)

    def row(r, rows):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, r, 1)
        return _put_row(rows, r, _prefill_one(decoder, rows.slots, cut(ids), cut(positions), cut(mask),
                                              rows.slots, chunk))

    rows = jax.lax.fori_loop(0, n, row, rows)
    drop = lambda a: a[:, :, extra:] if a.ndim == 4 else a[:, extra:]
    return _grow(M.KVCache(*(jax.tree.map(drop, (rows.k, rows.v, rows.valid))), jnp.int32(width - 1)), cache)


def _generate(decoder: M.Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, seen_mask: jax.Array,
              cache: M.KVCache, tables: R.RuleTables | None, eos_ids: jax.Array, temperature: jax.Array,
              top_p: jax.Array, key: jax.Array | None, *, max_new_tokens: int, row_chunk: int = 0
              ) -> tuple[jax.Array, jax.Array, M.KVCache]:
    """`generate`'s compiled program; `row_chunk` > 0 prefills the prompts one row at a time, that many tokens
    at a time (`_prefill_rows`)."""
    batch, width = prompt_ids.shape
    vocab, pad = decoder.cfg.vocab_size, _pad_id(decoder.cfg)
    positions = M.positions_from_mask(prompt_mask)
    sizes, full = attended_lengths(width, cache.slots), cache
    empty = lambda slots: full if slots == full.slots else M.KVCache.init(decoder.cfg, batch, slots)
    if row_chunk:
        cache = _prefill_rows(decoder, empty(sizes[0]), prompt_ids, positions, prompt_mask, row_chunk)
    else:
        cache = _prefill(decoder, empty(sizes[0]), prompt_ids, positions, prompt_mask)
    rows = jnp.arange(batch)
    seen = None  # (batch, vocab) bool: ids seen since the end of the user tag, for the diversity rule
    if tables is not None:
        seen = jnp.zeros((batch, vocab), bool).at[rows[:, None], jnp.where(seen_mask, prompt_ids, vocab)].set(
            True, mode="drop")

    def step(state):
        i, token, cache, out, length, done, seen = state
        logits, cache = decoder(token[:, None], (positions[:, -1] + i)[:, None], jnp.ones((batch, 1), bool), cache)
        scores = _scores(logits[:, 0], i, seen, tables)
        nxt = jnp.where(done, pad, _pick(scores, i, temperature, top_p, key))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        length = length + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos_ids)
        if tables is not None:
            seen = seen.at[rows, nxt].set(True)
        return i + 1, nxt, cache, out, length, done, seen

    def going(state):  # a segment ends when its cache is full
        return (state[0] < max_new_tokens) & ~jnp.all(state[5]) & (state[2].index < state[2].slots)

    state = (jnp.int32(0), prompt_ids[:, -1], cache, jnp.full((batch, max_new_tokens), pad, jnp.int32),
             jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), seen)
    for slots in sizes[1:] + [None]:  # one loop per segment; the cache grows into the next one's between them
        state = jax.lax.while_loop(going, step, state)
        if slots is not None:
            state = (*state[:2], _grow(state[2], empty(slots)), *state[3:])
    _, _, cache, out, length, _, _ = state
    return out, length, cache  # returning the donated cache lets XLA update it in place


def _grow(cache: M.KVCache, bigger: M.KVCache) -> M.KVCache:
    """`cache`'s contents written over the front of the larger cache `bigger` (its other slots kept)."""
    put = lambda big, small: jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim)
    return M.KVCache(tuple(map(put, bigger.k, cache.k)), tuple(map(put, bigger.v, cache.v)),
                     put(bigger.valid, cache.valid), cache.index)


def attended_lengths(width: int, slots: int, first: int = 128) -> list[int]:
    """The cache sizes of the decoding loop's segments: doubling from `first` (or the prompt width) up to all
    `slots`. A step attends to every slot of its segment's cache, so the cache read per step grows with the
    response instead of always covering `slots`, and is read whole (a prefix of a larger cache would be
    copied out at every layer of every step on XLA:CPU). Each segment compiles its own step and copies the
    cache once into the next, so the segments double in length to keep their number small."""
    lengths = [min(max(first, width), slots)]
    while lengths[-1] < slots:
        lengths.append(min(2 * lengths[-1], slots))
    return lengths


# The one jitted entry point: `max_new_tokens` fixes the output shape; the cache is donated.
_generate_jit = jax.jit(_generate, static_argnames=("max_new_tokens", "row_chunk"), donate_argnames=("cache",))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Slots:
    """Continuous batching's per-slot state (B,): which queued prompt a slot decodes (its instruction index
    `order[queue]` keys sampling), the token to feed next and its RoPE position, the response so far."""

    queue: jax.Array  # int32: queue entry decoded in this slot
    token: jax.Array  # int32: the token the next step feeds
    position: jax.Array  # int32: its RoPE position
    length: jax.Array  # int32: response tokens produced
    done: jax.Array  # bool: finished (or never filled): free for the next prompt
    seen: jax.Array | None  # (B, V) bool: the diversity rule's seen ids


# Continuous batching's state between calls: the slots, the cache, the next queue entry to prefill, the
# responses (N, max_new_tokens) and their lengths (N,).
ServeState = tuple[_Slots, M.KVCache, jax.Array, jax.Array, jax.Array]


def _pad_id(cfg: M.ModelConfig) -> int:
    """What fills the responses after their end."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else 0


def _pinned(state: ServeState) -> ServeState:
    """The state pinned to the active mesh by its logical axes (slots and cache rows along the batch), so that
    every call takes it placed as the one before returned it and runs the same compiled program."""
    slots, cache, nxt, out, lengths = state
    rows = lambda a: None if a is None else pinning.constrain(a, ("batch",) + (None,) * (a.ndim - 1))
    return (jax.tree.map(rows, slots), jax.tree.map(pinning.constrain, cache, cache.logical_axes()), nxt,
            pinning.constrain(out, (None, None)), pinning.constrain(lengths, (None,)))


@functools.partial(jax.jit, static_argnames=("vocab", "n_queue", "rules", "max_new_tokens", "pad"),
                   donate_argnames=("cache",))
def _serve_start(cache: M.KVCache, *, vocab: int, n_queue: int, rules: bool, max_new_tokens: int,
                 pad: int) -> ServeState:
    """Every slot free, nothing decoded; compiled, so that the state is placed where the cache is."""
    batch = cache.valid.shape[0]
    zeros = lambda: jnp.zeros(batch, jnp.int32)
    slots = _Slots(zeros(), zeros(), zeros(), zeros(), jnp.ones(batch, bool),
                   jnp.zeros((batch, vocab), bool) if rules else None)
    return _pinned((slots, cache, jnp.int32(0), jnp.full((n_queue, max_new_tokens), pad, jnp.int32),
                    jnp.zeros(n_queue, jnp.int32)))


def _serve(decoder: M.Decoder, queue_ids: jax.Array, queue_mask: jax.Array, queue_seen: jax.Array,
           queue_width: jax.Array, order: jax.Array, count: jax.Array, state: ServeState,
           tables: R.RuleTables | None, eos_ids: jax.Array, temperature: jax.Array, top_p: jax.Array,
           key: jax.Array | None, *, max_new_tokens: int, widths: tuple[int, ...], steps: int
           ) -> tuple[ServeState, jax.Array, jax.Array]:
    """Continuous batching, about `steps` decoding steps of it from `state`: decode the first `count` of the
    left-padded prompts `queue_ids` (N, W) in the cache's B slots; whenever a slot finishes (EOS or
    `max_new_tokens`), the next prompt is prefilled into it while the other slots keep their place. Prompt n is
    prefilled at its own padded width `widths[queue_width[n]]`, in chunks of the widths' greatest common
    divisor (`_prefill_row`), so prompts of every length share one queue and one drain. Each slot has its
    own write index, position and rule state, and samples with `key` folded by the prompt's instruction index
    `order[queue]` and its response length, so a response does not depend on which slot or batch it ran in,
    nor on where the calls split the work. Returns the state, the tokens produced in this call and whether
    work is left (the drain, once begun, runs to its end in one call)."""
    cache = state[1]
    batch, vocab = cache.valid.shape[0], decoder.cfg.vocab_size
    n_queue = queue_ids.shape[0]
    positions = M.positions_from_mask(queue_mask)
    chunk = functools.reduce(math.gcd, widths)  # prefill chunk: every width is a whole number of them
    front = lambda a: jnp.pad(a, ((0, 0), (1, 0)))  # a column before the widest prompt's prefill window
    queue_ids, queue_mask, queue_seen, positions = map(front, (queue_ids, queue_mask, queue_seen, positions))

    def width_of(nxt):
        return jnp.asarray(widths)[queue_width[jnp.minimum(nxt, n_queue - 1)]]

    def waiting(slots, cache, nxt):
        """A slot is free and the next prompt fits the current segment's cache (with its first new token)."""
        return jnp.any(slots.done) & (nxt < count) & (width_of(nxt) < cache.slots)

    def needed(state):
        """Cache slots the next step needs: each live row's next write, and the next prompt if a slot is free."""
        slots, cache, nxt = state[:3]
        live = jnp.max(jnp.where(slots.done, 0, cache.index + 1))
        return jnp.maximum(live, jnp.where(jnp.any(slots.done) & (nxt < count), width_of(nxt) + 1, 0))

    def unfinished(state):
        return ~jnp.all(state[0].done) | (state[2] < count)

    def within(state):  # this call's steps are not used up
        return state[6] < steps

    def draining(state):  # the queue is empty and few rows are left: they finish in a smaller batch
        return (state[2] >= count) & (jnp.sum(~state[0].done) <= drain_rows)

    def refill(carry):
        """Prefill the next queued prompt into the first free slot."""
        slots, cache, nxt = carry
        r = jnp.argmax(slots.done)
        ids, mask, pos = (jax.lax.dynamic_slice_in_dim(a, nxt, 1) for a in (queue_ids, queue_mask, positions))
        cache = _prefill_row(decoder, cache, r, ids, pos, mask, width_of(nxt), chunk)
        seen = slots.seen
        if seen is not None:
            prompt = jax.lax.dynamic_index_in_dim(queue_seen, nxt, keepdims=False)
            seen = seen.at[r].set(jnp.zeros(vocab, bool).at[jnp.where(prompt, ids[0], vocab)].set(True, mode="drop"))
        slots = _Slots(slots.queue.at[r].set(nxt), slots.token.at[r].set(ids[0, -1]),
                       slots.position.at[r].set(pos[0, -1]), slots.length.at[r].set(0),
                       slots.done.at[r].set(False), seen)
        return slots, cache, nxt + 1

    def step(state, refills: bool = True):
        slots, cache, nxt, out, lengths, made, taken = state
        if refills:
            slots, cache, nxt = jax.lax.while_loop(lambda c: waiting(*c), refill, (slots, cache, nxt))
        index = cache.index
        logits, cache = decoder(slots.token[:, None], slots.position[:, None], ~slots.done[:, None], cache)
        scores = _scores(logits[:, 0], slots.length[:, None], slots.seen, tables)
        row_keys = None if key is None else jax.vmap(lambda q: jax.random.fold_in(key, q))(order[slots.queue])
        token = jax.vmap(lambda s, n, k: _pick(s[None], n, temperature, top_p, k)[0],
                         in_axes=(0, 0, None if key is None else 0))(scores, slots.length, row_keys)
        live = ~slots.done
        target = jnp.where(live, slots.queue, n_queue)  # free slots write nowhere (dropped)
        out = out.at[target, slots.length].set(token, mode="drop")
        length = slots.length + live
        lengths = lengths.at[target].set(length, mode="drop")
        done = slots.done | jnp.isin(token, eos_ids) | (length >= max_new_tokens)
        rows = jnp.arange(live.shape[0])
        seen = None if slots.seen is None else slots.seen.at[rows, token].set(slots.seen[rows, token] | live)
        cache = M.KVCache(cache.k, cache.v, cache.valid, jnp.where(live, cache.index, index))  # free slots stay put
        slots = _Slots(slots.queue, token, slots.position + 1, length, done, seen)
        return slots, cache, nxt, out, lengths, made + jnp.sum(live), taken + 1

    def segment(k: int) -> Callable:
        """Decode with a cache of `sizes[k]` slots (the full cache's prefix, written back after) for as long as
        the rows need more than the next smaller size and no more than this one."""
        lower, size = ([0] + sizes)[k], sizes[k]

        def going(st):
            need = needed(st)
            return unfinished(st) & within(st) & (lower < need) & (need <= size) & ~draining(st)

        def run(state):
            full = state[1]
            seg = full if size == full.slots else M.KVCache(
                tuple(a[:, :, :size] for a in full.k), tuple(a[:, :, :size] for a in full.v),
                full.valid[:, :size], full.index)
            state = jax.lax.while_loop(going, step, (state[0], seg, *state[2:]))
            return (state[0], state[1] if size == full.slots else _grow(state[1], full), *state[2:])
        return run

    def drain(state):
        """The last live rows, gathered into `drain_rows` slots, decoded to the end (the full cache's rows
        are left as they were)."""
        slots, full = state[:2]
        keep = jnp.argsort(slots.done)[:drain_rows]  # the live slots first
        few = jax.tree.map(lambda a: a[keep], (slots, full))
        few = jax.lax.while_loop(lambda st: ~jnp.all(st[0].done), functools.partial(step, refills=False),
                                 (*few, *state[2:]))
        return (dataclasses.replace(slots, done=jnp.ones_like(slots.done)), full, *few[2:])

    def phase(state):
        """The branch for the next stretch: the smallest segment the rows need, or the drain."""
        k = jnp.searchsorted(jnp.asarray(sizes), needed(state))
        return jnp.where(draining(state), len(sizes), k)

    # Segments double from `SERVE_FIRST_SEGMENT` slots (`attended_lengths`): a step reads only as much cache as its
    # rows need, going back down when a long response ends. The last rows drain in a quarter of the slots.
    sizes = attended_lengths(widths[0] + 1, cache.slots, SERVE_FIRST_SEGMENT)
    drain_rows = batch // 4
    branches = [segment(k) for k in range(len(sizes))] + [drain] * (drain_rows > 0)
    state = jax.lax.while_loop(lambda st: unfinished(st) & within(st),
                               lambda st: jax.lax.switch(phase(st), branches, st), (*state, jnp.int32(0), jnp.int32(0)))
    return _pinned(state[:5]), state[5], unfinished(state)


# Cache slots of continuous batching's smallest segment. Each segment adds a decoding step and a prefill, all
# layers unrolled, to `_serve`'s program, and loading a program from JAX's persistent cache takes time that
# grows faster than its size (XLA:CPU looks up each YNNPACK fusion's instruction by scanning: 85% of the load
# in a profile). The longest of a batch's live rows picks the segment, so a 128-slot segment ran only 64 of the
# evaluation workload's 1,572 steps at 16 slots; without it, `_serve` for that workload loads in 15 s instead of
# 29 and compiles in 37 s instead of 46 (Zen 3, 2 cores).
SERVE_FIRST_SEGMENT = 256

# Continuous batching's compiled program: the state (its cache included) is donated and updated in place.
_serve_jit = jax.jit(_serve, static_argnames=("max_new_tokens", "widths", "steps"), donate_argnames=("state",))

# Decoding steps per call of `_serve_jit`: progress is reported between calls (a host callback inside the
# loop would keep the program out of JAX's persistent compilation cache). A call that ends inside a smaller
# segment copies that segment's cache back into the full one, and the next call copies it out again.
STEPS_PER_CALL = 64


def serve_queue(decoder: M.Decoder, queue_ids: np.ndarray, queue_mask: np.ndarray, queue_seen: np.ndarray,
                queue_width: np.ndarray, order: np.ndarray, count: int, cache: M.KVCache,
                tables: R.RuleTables | None, eos_ids: Sequence[int], temperature: float, top_p: float,
                key: jax.Array | None, *, max_new_tokens: int, widths: tuple[int, ...],
                on_tokens: Callable[[int], None] | None = None) -> tuple[jax.Array, jax.Array]:
    """Decode a queue of prompts by continuous batching (`_serve`) in calls of `STEPS_PER_CALL` steps;
    `on_tokens(n)` after each call with the tokens it produced. Returns tokens (N, max_new_tokens) and
    lengths (N,)."""
    state = _serve_start(cache, vocab=decoder.cfg.vocab_size, n_queue=queue_ids.shape[0], rules=tables is not None,
                         max_new_tokens=max_new_tokens, pad=_pad_id(decoder.cfg))
    # Committed to its devices as the decoding calls return it (an unsharded cache is not), so that every call
    # runs one compiled program.
    state = jax.tree.map(lambda a: a if a.committed else jax.device_put(a, a.sharding), state)
    eos_ids, temperature, top_p = np.array(eos_ids, np.int32).reshape(-1), np.float32(temperature), np.float32(top_p)
    more = True
    while more:
        state, made, more = _serve_jit(decoder, queue_ids, queue_mask, queue_seen, queue_width, order, np.int32(count),
                                       state, tables, eos_ids, temperature, top_p, key, max_new_tokens=max_new_tokens,
                                       widths=widths, steps=STEPS_PER_CALL)
        if on_tokens is not None:
            on_tokens(int(made))
        more = bool(more)
    return state[3], state[4]


def _check_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def check_settings(max_new_tokens: int, batch_size: int, bucket: int, temperature: float, top_p: float) -> None:
    """`generate_texts`' settings, checked before any model work (a zero batch or bucket would fail only
    after the weights load and the first compilations)."""
    _check_new_tokens(max_new_tokens)
    for name, value in (("batch_size", batch_size), ("bucket", bucket)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"decode.{name}={value!r} must be a positive integer")
    if not (temperature >= 0 and 0 < top_p <= 1):  # written so that NaN fails too
        raise ValueError(f"need decode.temperature >= 0 and 0 < decode.top_p <= 1, got {temperature}, {top_p}")


def _check(cfg: M.ModelConfig, prompt_ids, prompt_mask, seen_mask, max_new_tokens, temperature, top_p, key) -> None:
    _check_new_tokens(max_new_tokens)
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (batch, seq) array, got shape {prompt_ids.shape}")
    for name, arr in (("prompt_mask", prompt_mask), ("seen_mask", seen_mask)):
        if arr.shape != prompt_ids.shape:
            raise ValueError(f"{name} has shape {arr.shape}, prompt_ids {prompt_ids.shape}")
    if not np.all(prompt_mask[:, -1]):
        row = int(np.argmin(prompt_mask[:, -1]))
        raise ValueError(f"prompt row {row} does not end in a real token: prompts must be left-padded")
    lengths = prompt_mask.sum(axis=1)
    longest = int(np.argmax(lengths))
    if lengths[longest] + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt row {longest} has {lengths[longest]} tokens; with max_new_tokens={max_new_tokens} "
                         f"it exceeds the context of {cfg.max_position_embeddings} positions")
    ids = prompt_ids[prompt_mask]
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), found {ids.min()}..{ids.max()}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")


def generate(decoder: M.Decoder, prompt_ids, prompt_mask, *, max_new_tokens: int,
             rules: R.RuleTables | None = None, eos_ids: Sequence[int] = (), seen_mask=None,
             temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
             cache: M.KVCache | None = None) -> tuple[jax.Array, jax.Array]:
    """Decode up to `max_new_tokens` for each left-padded prompt row.

    Returns `tokens` (batch, max_new_tokens) int32 and `lengths` (batch,): row r produced
    `tokens[r, :lengths[r]]`, ending with an EOS id when it stopped early (the rest is padding).
    `rules` adds the rule-based expert; its diversity rule counts the prompt tokens marked in
    `seen_mask` (default: every real prompt token). `temperature > 0` samples with `key`.
    `cache` (donated) may be given pre-placed; it must hold `seq + max_new_tokens - 1` slots. On one device, a
    batch of mixed lengths is prefilled one row at a time, skipping each row's padding (`_row_chunk`).
    """
    cfg = decoder.cfg
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask, bool)
    seen = mask if seen_mask is None else np.asarray(seen_mask, bool)
    _check(cfg, ids, mask, seen, max_new_tokens, temperature, top_p, key)
    seen = seen & mask
    slots = ids.shape[1] + max_new_tokens - 1
    if cache is None:
        cache = M.KVCache.init(cfg, ids.shape[0], slots)
    elif cache.slots != slots:
        raise ValueError(f"cache has {cache.slots} slots; this batch needs {slots}")
    rows = _global_rows(cache) if jax.process_count() > 1 else jnp.asarray
    tokens, lengths, _ = _generate_jit(
        M.unstack(decoder), rows(ids.astype(np.int32)), rows(mask), rows(seen), cache, rules,
        jnp.asarray(list(eos_ids), jnp.int32).reshape(-1), jnp.float32(temperature), jnp.float32(top_p),
        key if temperature > 0 else None, max_new_tokens=max_new_tokens, row_chunk=_row_chunk(cache, mask))
    if jax.process_count() > 1:  # every process gets every row back
        from jax.experimental import multihost_utils

        tokens, lengths = multihost_utils.process_allgather((tokens, lengths), tiled=True)
    return tokens, lengths


def _row_chunk(cache: M.KVCache, mask: np.ndarray) -> int:
    """The chunk for prefilling one row at a time, or 0 for the whole batch at once. Rows go one at a time on
    one device, when their chunks hold under half the batch's padded tokens; on a mesh the batch is split
    over devices, and rows one at a time would not be."""
    n, width = mask.shape
    if n == 1 or width == 1 or len(cache.k[0].sharding.device_set) > 1:
        return 0
    chunk = min(PREFILL_CHUNK, width - 1)
    chunks = -(-(mask[:, :-1].sum(axis=1)) // chunk)
    return chunk if 2 * int(chunks.sum()) * chunk < n * (width - 1) else 0


def _global_rows(cache: M.KVCache) -> Callable[[np.ndarray], jax.Array]:
    """Multi-host: a (batch, ...) host array that every process holds whole, as a global array split by rows
    like the cache's batch axis."""
    spec = cache.k[0].sharding.spec
    sharding = jax.sharding.NamedSharding(cache.k[0].sharding.mesh,
                                          jax.sharding.PartitionSpec(spec[0] if len(spec) else None))
    return lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
