"""Batched decoding in one compiled program: prefill, then a `lax.while_loop` over a fixed-size,
donated KV cache that stops once every row has produced EOS or `max_new_tokens` tokens. The
rule-based adapter (`rules.py`) is applied to the logits inside the same step, so there is no
host round trip per token.

`generate` works on token arrays (left-padded prompts); `generate_texts` is the host-side helper
that formats, tokenizes, buckets and detokenizes a list of instructions. Every array reaches the
jitted function as an argument (nothing is closed over) so a caller may place the decoder, cache
and batch on a device mesh beforehand.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_implicit import model as M
from jax_implicit import prompts
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


def _generate(decoder: M.Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, seen_mask: jax.Array,
              cache: M.KVCache, tables: R.RuleTables | None, eos_ids: jax.Array, temperature: jax.Array,
              top_p: jax.Array, key: jax.Array | None, *, max_new_tokens: int
              ) -> tuple[jax.Array, jax.Array, M.KVCache]:
    batch, width = prompt_ids.shape
    vocab = decoder.cfg.vocab_size
    pad = decoder.cfg.pad_token_id if decoder.cfg.pad_token_id is not None else 0
    positions = M.positions_from_mask(prompt_mask)
    if width > 1:  # prefill all but the last prompt token; its logits are unused, so XLA drops the head
        _, cache = decoder(prompt_ids[:, :-1], positions[:, :-1], prompt_mask[:, :-1], cache)
    rows = jnp.arange(batch)
    seen = None  # (batch, vocab) bool: ids seen since the end of the user tag, for the diversity rule
    if tables is not None:
        seen = jnp.zeros((batch, vocab), bool).at[rows[:, None], jnp.where(seen_mask, prompt_ids, vocab)].set(
            True, mode="drop")

    def step(state):
        i, token, cache, out, length, done, seen = state
        logits, cache = decoder(token[:, None], (positions[:, -1] + i)[:, None], jnp.ones((batch, 1), bool), cache)
        scores = jax.nn.log_softmax(logits[:, 0], axis=-1)
        if tables is not None:
            scores = scores + jax.nn.log_softmax(R.scores(tables, i, seen), axis=-1)
        nxt = jnp.where(done, pad, _pick(scores, i, temperature, top_p, key))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        length = length + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos_ids)
        if tables is not None:
            seen = seen.at[rows, nxt].set(True)
        return i + 1, nxt, cache, out, length, done, seen

    def going(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[5])

    init = (jnp.int32(0), prompt_ids[:, -1], cache, jnp.full((batch, max_new_tokens), pad, jnp.int32),
            jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), seen)
    _, _, cache, out, length, _, _ = jax.lax.while_loop(going, step, init)
    return out, length, cache  # returning the donated cache lets XLA update it in place


# The one jitted entry point: `max_new_tokens` fixes the output shape; the cache is donated.
_generate_jit = jax.jit(_generate, static_argnames=("max_new_tokens",), donate_argnames=("cache",))


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
    `cache` (donated) may be given pre-placed; it must hold `seq + max_new_tokens - 1` slots.
    """
    cfg = decoder.cfg
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask, bool)
    seen = mask if seen_mask is None else np.asarray(seen_mask, bool)
    _check(cfg, ids, mask, seen, max_new_tokens, temperature, top_p, key)
    seen = seen & mask
    slots = ids.shape[1] + max_new_tokens - 1
    if cache is None:
        cache = M.KVCache.init(cfg, ids.shape[0], slots)
    elif cache.k.shape[2] != slots:
        raise ValueError(f"cache has {cache.k.shape[2]} slots; this batch needs {slots}")
    rows = _global_rows(cache) if jax.process_count() > 1 else jnp.asarray
    tokens, lengths, _ = _generate_jit(
        decoder, rows(ids.astype(np.int32)), rows(mask), rows(seen), cache, rules,
        jnp.asarray(list(eos_ids), jnp.int32).reshape(-1), jnp.float32(temperature), jnp.float32(top_p),
        key if temperature > 0 else None, max_new_tokens=max_new_tokens)
    if jax.process_count() > 1:  # every process gets every row back
        from jax.experimental import multihost_utils

        tokens, lengths = multihost_utils.process_allgather((tokens, lengths), tiled=True)
    return tokens, lengths


def _global_rows(cache: M.KVCache) -> Callable[[np.ndarray], jax.Array]:
    """Multi-host: a (batch, ...) host array that every process holds whole, as a global array split by rows
    like the cache's batch axis."""
    spec = cache.k.sharding.spec
    sharding = jax.sharding.NamedSharding(cache.k.sharding.mesh,
                                          jax.sharding.PartitionSpec(spec[1] if len(spec) > 1 else None))
    return lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ----------------------------------------------------------------------------- text in, text out


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    seen_from: int  # first token after the user tag: where the diversity rule starts counting


def encode(tokenizer, instruction: str, tag_set: str = "user_assistant") -> Prompt:
    """Tokenize the evaluation prompt (BOS as the tokenizer adds it) and locate the end of the user tag."""
    text = prompts.generation_prompt(instruction, tag_set)
    enc = tokenizer(text, return_offsets_mapping=True)
    user_end = len(prompts.tags(tag_set)[0])
    starts = [k for k, (_, end) in enumerate(enc["offset_mapping"]) if end > user_end]
    return Prompt(list(enc["input_ids"]), starts[0])


def encode_all(tokenizer, instructions: Sequence[str], tag_set: str, max_new_tokens: int,
               context: int) -> list[Prompt]:
    """`encode` every instruction, failing (by index) on an empty list or a prompt that does not fit
    in `context` positions together with `max_new_tokens`."""
    if len(instructions) == 0:
        raise ValueError("no instructions to decode")
    _check_new_tokens(max_new_tokens)
    encoded = [encode(tokenizer, ins, tag_set) for ins in instructions]
    check_fit(encoded, max_new_tokens, context)
    return encoded


def check_fit(encoded: Sequence[Prompt], max_new_tokens: int, context: int, what: str = "instruction") -> None:
    for k, p in enumerate(encoded):
        if len(p.ids) + max_new_tokens > context:
            raise ValueError(f"{what} {k} is {len(p.ids)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the context of {context} positions")


def pad_batch(batch: Sequence[Prompt], rows: int, bucket: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """Left-pad to a multiple of `bucket` columns and `rows` rows (dummy rows repeat the first prompt)
    so that a whole dataset compiles to a few shapes."""
    width = -(-max(len(p.ids) for p in batch) // bucket) * bucket
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), bool)
    seen = np.zeros((rows, width), bool)
    for r in range(rows):
        p = batch[r] if r < len(batch) else batch[0]
        n = len(p.ids)
        ids[r, width - n:] = p.ids
        mask[r, width - n:] = True
        seen[r, width - n + p.seen_from:] = True
    return ids, mask, seen


def eos_ids_for(cfg: M.ModelConfig, tokenizer) -> tuple[int, ...]:
    """Stop on the model's EOS ids and the tokenizer's EOS token."""
    ids = set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return tuple(sorted(ids))


def sharded_cache(cfg: M.ModelConfig, sharder, rows: int, slots: int) -> M.KVCache:
    """An empty KV cache made directly in its shards (rows like the batch, KV heads like the parameters)."""
    make = lambda: M.KVCache.init(cfg, rows, slots)
    return jax.jit(make, out_shardings=sharder.cache(jax.eval_shape(make)))()


def generate_texts(decoder: M.Decoder, tokenizer, instructions: Sequence[str], *, max_new_tokens: int,
                   rules: R.RuleTables | None = None, tag_set: str = "user_assistant", batch_size: int = 16,
                   bucket: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   on_batch: Callable[[dict[int, str], int], None] | None = None,
                   done: Mapping[int, str] | None = None, sharder=None) -> list[str]:
    """Responses to `instructions`, in order. Prompts are sorted by length and batched so padding
    stays small; `on_batch({index: response}, new_tokens)` is called after each batch (progress bars, keeping
    finished work). A batch all of whose responses are in `done` (by index) is taken from there, not decoded:
    a rerun decodes the same batches with the same keys, so its responses are those of an uninterrupted run.
    With a `sharding.Sharder` (the decoder already on its mesh) each batch's KV cache is created in its shards."""
    check_settings(max_new_tokens, batch_size, bucket, temperature, top_p)
    encoded = encode_all(tokenizer, instructions, tag_set, max_new_tokens, decoder.cfg.max_position_embeddings)
    return generate_prompts(decoder, tokenizer, encoded, max_new_tokens=max_new_tokens, rules=rules,
                            batch_size=batch_size, bucket=bucket, temperature=temperature, top_p=top_p, seed=seed,
                            on_batch=on_batch, done=done, sharder=sharder)


def generate_prompts(decoder: M.Decoder, tokenizer, encoded: Sequence[Prompt], *, max_new_tokens: int,
                     rules: R.RuleTables | None = None, batch_size: int = 16, bucket: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     on_batch: Callable[[dict[int, str], int], None] | None = None,
                     done: Mapping[int, str] | None = None, sharder=None) -> list[str]:
    """`generate_texts` for prompts already tokenized in any format (a judge's chat template, say)."""
    cfg = decoder.cfg
    eos = eos_ids_for(cfg, tokenizer)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k].ids))
    key = jax.random.key(seed)
    outputs: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if done is not None and all(k in done for k in chunk):
            for k in chunk:
                outputs[k] = done[k]
            continue
        ids, mask, seen = pad_batch([encoded[k] for k in chunk], min(batch_size, len(order)), bucket, pad_id)
        slots = ids.shape[1] + max_new_tokens - 1
        cache = None if sharder is None else sharded_cache(cfg, sharder, ids.shape[0], slots)
        tokens, lengths = generate(decoder, ids, mask, seen_mask=seen, max_new_tokens=max_new_tokens, rules=rules,
                                   eos_ids=eos, temperature=temperature, top_p=top_p,
                                   key=jax.random.fold_in(key, start), cache=cache)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        for r, k in enumerate(chunk):
            row = tokens[r, :lengths[r]]
            if len(row) and row[-1] in eos:
                row = row[:-1]
            outputs[k] = tokenizer.decode(row, skip_special_tokens=True)
        if on_batch is not None:
            on_batch({k: outputs[k] for k in chunk}, int(lengths[:len(chunk)].sum()))
    return outputs
