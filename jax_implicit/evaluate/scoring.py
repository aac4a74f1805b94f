"""Log-probabilities of text under a `Decoder`, packed by length into a few fixed shapes.

Both the response-ranking metric and the local judge need the model's log-probabilities of
given tokens, never a sampled continuation. Sequences sorted by length fill batches of at most
`batch_tokens` (rows x padded length) at the padded lengths of `batching.sizes`, so padding stays
small and a whole dataset costs one compilation per length used. Log-probabilities are training's
(`memory.token_logprobs`, `loss_chunk` tokens at a time). With a `partial.Partial`, each finished batch
is kept (keyed by the content of its rows) and a rerun computes only the batches not yet done.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax_implicit import batching, memory, partial
from jax_implicit import model as M

MIN_LENGTH = 32  # the shortest padded length


def check_lengths(seqs: Sequence[Sequence[int]], max_len: int, what: str) -> None:
    for i, s in enumerate(seqs):
        if len(s) > max_len:
            raise ValueError(f"{what} {i} is {len(s)} tokens, longer than the model's context of {max_len}")


def batches(decoder: M.Decoder, seqs: Sequence[Sequence[int]], batch_tokens: int) -> list[batching.Batch]:
    """`batching.pack` of `seqs` at the padded lengths up to the model's context."""
    context = decoder.cfg.max_position_embeddings
    return batching.pack([len(s) for s in seqs], batch_tokens, batching.sizes(min(MIN_LENGTH, context), context))


def _hidden(decoder: M.Decoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return decoder.hidden(ids, M.positions_from_mask(mask), mask)[0]


def _logprobs(decoder: M.Decoder, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) after `hidden`, as training's loss computes it (the decoder's head and `loss_chunk`)."""
    return memory.token_logprobs(hidden, decoder.head()[...], targets, decoder.cfg.loss_chunk)


@jax.jit
def _continuation(decoder: M.Decoder, ids: jax.Array, mask: jax.Array, target: jax.Array):
    """Per row: sum of log p(ids[t] | ids[:t]) over positions t with target[t], and their count."""
    logp = _logprobs(decoder, _hidden(decoder, ids, mask)[:, :-1], ids[:, 1:])
    scored = target[:, 1:]
    return jnp.sum(jnp.where(scored, logp, 0.0), axis=-1), jnp.sum(scored, axis=-1)


@jax.jit
def _next_token(decoder: M.Decoder, ids: jax.Array, mask: jax.Array, candidates: jax.Array) -> jax.Array:
    """Per row: log-probabilities of `candidates` as the token after the row's last real token."""
    last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
    final = jnp.take_along_axis(_hidden(decoder, ids, mask), last[:, None, None], axis=1)  # (B, 1, D)
    rows, k = ids.shape[0], len(candidates)  # each candidate scored after a copy of the final hidden state
    return _logprobs(decoder, jnp.broadcast_to(final, (rows, k, final.shape[-1])),
                     jnp.broadcast_to(candidates, (rows, k)))


def _padded(seqs: Sequence[Sequence[int]], batch: batching.Batch) -> tuple[np.ndarray, np.ndarray]:
    """A batch's right-padded (ids, mask)."""
    rows = [seqs[i] for i in batch.index]
    return (batching.pad(rows, batch.rows, batch.width),
            batching.pad(batching.real(map(len, rows)), batch.rows, batch.width, dtype=bool))


def continuation_logprobs(decoder: M.Decoder, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                          batch_tokens: int = 4096, desc: str = "scoring",
                          keep: partial.Partial | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log-probabilities of tokens `seqs[i][starts[i]:]` given the tokens before them, and their count."""
    check_lengths(seqs, decoder.cfg.max_position_embeddings, "sequence")
    total, count = np.zeros(len(seqs)), np.zeros(len(seqs), np.int64)
    keys = [partial.digest([list(q), int(a)]) for q, a in zip(seqs, starts)] if keep else None
    for batch in tqdm(batches(decoder, seqs, batch_tokens), desc=desc, unit="batch"):
        rows = batch.index
        done = keep.get([keys[i] for i in rows]) if keep else None
        if done is None:
            target = batching.pad([np.arange(len(seqs[i])) >= starts[i] for i in rows], batch.rows, batch.width,
                                  dtype=bool)
            s, c = _continuation(decoder, *_padded(seqs, batch), target)
            done = list(zip(np.asarray(s)[:len(rows)].tolist(), np.asarray(c)[:len(rows)].tolist()))
            if keep:
                keep.add([keys[i] for i in rows], done)
        total[rows], count[rows] = zip(*done)
    return total, count


def next_token_logprobs(decoder: M.Decoder, seqs: Sequence[Sequence[int]], candidates: Sequence[int], *,
                        batch_tokens: int = 4096, desc: str = "judging",
                        keep: partial.Partial | None = None) -> np.ndarray:
    """(len(seqs), len(candidates)) log-probabilities of each candidate token following each sequence."""
    check_lengths(seqs, decoder.cfg.max_position_embeddings, "prompt")
    out = np.zeros((len(seqs), len(candidates)))
    cand = jnp.asarray(list(candidates), jnp.int32)
    keys = [partial.digest([list(q), list(candidates)]) for q in seqs] if keep else None
    for batch in tqdm(batches(decoder, seqs, batch_tokens), desc=desc, unit="batch"):
        rows = batch.index
        done = keep.get([keys[i] for i in rows]) if keep else None
        if done is None:
            done = np.asarray(_next_token(decoder, *_padded(seqs, batch), cand))[:len(rows)].tolist()
            if keep:
                keep.add([keys[i] for i in rows], done)
        out[rows] = done
    return out
