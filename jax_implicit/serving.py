"""Decoding text: instructions formatted and tokenized, decoded by continuous batching
(`decode._serve`), detokenized. `generate_texts` is what `generate`, the sweep, the local judge and the refusal
evaluation call; a response depends only on its prompt and index, so work kept from a killed run is reused
exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from jax_implicit import batching, decode, prompts
from jax_implicit import model as M
from jax_implicit import rules as R


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
    decode._check_new_tokens(max_new_tokens)
    encoded = [encode(tokenizer, ins, tag_set) for ins in instructions]
    check_fit(encoded, max_new_tokens, context)
    return encoded


def check_fit(encoded: Sequence[Prompt], max_new_tokens: int, context: int, what: str = "instruction") -> None:
    for k, p in enumerate(encoded):
        if len(p.ids) + max_new_tokens > context:
            raise ValueError(f"{what} {k} is {len(p.ids)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the context of {context} positions")


def eos_ids_for(cfg: M.ModelConfig, tokenizer) -> tuple[int, ...]:
    """Stop on the model's EOS ids and the tokenizer's EOS token."""
    ids = set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return tuple(sorted(ids))


def sharded_cache(cfg: M.ModelConfig, sharder, rows: int, slots: int, per_row: bool = False) -> M.KVCache:
    """An empty KV cache made directly in its shards (rows like the batch, KV heads like the parameters)."""
    make = lambda: M.KVCache.init(cfg, rows, slots, per_row)
    return jax.jit(make, out_shardings=sharder.cache(jax.eval_shape(make)))()


def generate_texts(decoder: M.Decoder, tokenizer, instructions: Sequence[str], *, max_new_tokens: int,
                   rules: R.RuleTables | None = None, tag_set: str = "user_assistant", batch_size: int = 16,
                   bucket: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   on_batch: Callable[[dict[int, str], int], None] | None = None,
                   done: Mapping[int, str] | None = None, sharder=None,
                   on_tokens: Callable[[int], None] | None = None) -> list[str]:
    """Responses to `instructions`, in order, by continuous batching in `batch_size` slots (`generate_prompts`).
    `on_batch({index: response}, new_tokens)` reports finished work (progress bars, partial files); responses in
    `done` (by index) are taken from there, and a rerun gives the responses of an uninterrupted run.
    With a `sharding.Sharder` (the decoder already on its mesh) the KV cache is created in its shards."""
    decode.check_settings(max_new_tokens, batch_size, bucket, temperature, top_p)
    encoded = encode_all(tokenizer, instructions, tag_set, max_new_tokens, decoder.cfg.max_position_embeddings)
    return generate_prompts(decoder, tokenizer, encoded, max_new_tokens=max_new_tokens, rules=rules,
                            batch_size=batch_size, bucket=bucket, temperature=temperature, top_p=top_p, seed=seed,
                            on_batch=on_batch, done=done, sharder=sharder, on_tokens=on_tokens)


def generate_prompts(decoder: M.Decoder, tokenizer, encoded: Sequence[Prompt], *, max_new_tokens: int,
                     rules: R.RuleTables | None = None, batch_size: int = 16, bucket: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     on_batch: Callable[[dict[int, str], int], None] | None = None,
                     done: Mapping[int, str] | None = None, sharder=None,
                     on_tokens: Callable[[int], None] | None = None) -> list[str]:
    """`generate_texts` for prompts already tokenized in any format (a judge's chat template, say), by
    continuous batching (`serve`). A response depends only on its prompt and index, so the responses in
    `done` (by index) are taken from there and a resumed run equals an uninterrupted one.
    `on_batch({index: response}, new_tokens)` is called after each group of `serve`."""
    eos = eos_ids_for(decoder.cfg, tokenizer)
    done = done or {}
    outputs = [done.get(k, "") for k in range(len(encoded))]
    todo = {k: p for k, p in enumerate(encoded) if k not in done}
    for rows in serve(decoder, todo, eos, max_new_tokens=max_new_tokens, rules=rules, batch_size=batch_size,
                      bucket=bucket, temperature=temperature, top_p=top_p, seed=seed, sharder=sharder,
                      on_tokens=on_tokens):
        texts = {k: tokenizer.decode(row, skip_special_tokens=True) for k, row in rows.items()}
        for k, text in texts.items():
            outputs[k] = text
        if on_batch is not None:
            on_batch(texts, sum(map(len, rows.values())))
    return outputs


# Prompts queued per decoding slot in one queue (`decode.serve_queue`): a queue drains its slots at the end (its
# last rows decode in a mostly empty batch), and a killed run loses at most the queue in flight.
QUEUED_PER_SLOT = 16


def serve(decoder: M.Decoder, prompts: Mapping[int, Prompt], eos: Sequence[int], *, max_new_tokens: int,
          rules: R.RuleTables | None = None, batch_size: int = 16, bucket: int = 64, temperature: float = 0.0,
          top_p: float = 1.0, seed: int = 0, sharder=None, on_tokens: Callable[[int], None] | None = None
          ) -> Iterator[dict[int, list[int]]]:
    """Continuous batching of `prompts` {instruction index: prompt}, shortest first, decoded in `batch_size`
    slots by `decode.serve_queue`: a finished response's slot takes the next prompt at once, prefilled at its own
    padded width (`batching.prompt_width` from `bucket` up, so few shapes compile). One queue holds at most
    `QUEUED_PER_SLOT * batch_size` prompts, so that finished work comes back (and is kept) as it goes.
    Yields {index: response ids, EOS dropped} per queue; `on_tokens(n)` is called every
    `decode.STEPS_PER_CALL` decoding steps with the tokens they produced."""
    cfg, decoder = decoder.cfg, M.unstack(decoder)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    shortest_first = sorted(prompts, key=lambda k: len(prompts[k].ids))
    slots = min(batch_size, len(prompts))
    chunk = QUEUED_PER_SLOT * slots
    for group in (shortest_first[i:i + chunk] for i in range(0, len(shortest_first), chunk)):
        own = [batching.prompt_width(len(prompts[k].ids), bucket) for k in group]
        widths = tuple(sorted(set(own)))
        queue = 1 << (len(group) - 1).bit_length()  # queue rows: a power of two, for few compiled shapes
        ids, mask, seen = batching.pad_prompts([prompts[k] for k in group], queue, bucket, pad_id)
        order, width = (np.array(a + [0] * (queue - len(group)), np.int32)
                        for a in (group, [widths.index(w) for w in own]))
        shape = (slots, ids.shape[1] + max_new_tokens)  # a prompt's prefill fills as many slots as its width
        cache = (M.KVCache.init(cfg, *shape, per_row=True) if sharder is None
                 else sharded_cache(cfg, sharder, *shape, per_row=True))
        tokens, lengths = decode.serve_queue(
            decoder, ids, mask, seen, width, order, len(group), cache, rules, eos, temperature, top_p,
            jax.random.key(seed) if temperature > 0 else None, max_new_tokens=max_new_tokens, widths=widths,
            on_tokens=on_tokens)
        if not tokens.is_fully_addressable:  # multi-host: every process gets every row
            from jax.experimental import multihost_utils

            tokens, lengths = multihost_utils.process_allgather((tokens, lengths), tiled=True)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        rows = {k: tokens[r, :lengths[r]].tolist() for r, k in enumerate(group)}
        yield {k: row[:-1] if row and row[-1] in eos else row for k, row in rows.items()}
