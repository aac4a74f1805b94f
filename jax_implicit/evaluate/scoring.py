"""Log-probabilities of text under a `Decoder`, batched into a few fixed shapes.

Both the response-ranking metric and the local judge need the model's log-probabilities of
given tokens, never a sampled continuation. Sequences are right-padded into power-of-two length
buckets and each bucket always runs with the same number of rows (`batch_tokens // length`), so a
whole dataset costs one compilation per bucket used. With a `partial.Partial`, each finished batch is
kept (keyed by the content of its rows) and a rerun computes only the batches not yet done.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax_implicit import partial
from jax_implicit import model as M

MIN_BUCKET = 32


def bucket_length(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def check_lengths(seqs: Sequence[Sequence[int]], max_len: int, what: str) -> None:
    for i, s in enumerate(seqs):
        if len(s) > max_len:
            raise ValueError(f"{what} {i} is {len(s)} tokens, longer than the model's context of {max_len}")


def _batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(bucket length, padded rows, row indices) per batch: rows sorted by length, at most
    batch_tokens // length of them. A bucket's last batch is padded only up to a power of two rows:
    shapes stay few, and a bucket of 3 rows does not pay for 64 rows of padding."""
    order = np.argsort(lengths, kind="stable")
    buckets = np.array([bucket_length(int(n)) for n in lengths[order]])
    for width in np.unique(buckets):
        rows = order[buckets == width]
        per = max(1, batch_tokens // int(width))
        for start in range(0, len(rows), per):
            chunk = rows[start:start + per]
            yield int(width), min(per, 1 << (len(chunk) - 1).bit_length()), chunk


def _pad(seqs: Sequence[Sequence[int]], rows: np.ndarray, width: int, n_rows: int,
         starts: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (ids, mask, target) of n_rows rows; target marks the tokens from starts[i] on."""
    ids = np.zeros((n_rows, width), np.int32)
    mask = np.zeros((n_rows, width), bool)
    target = np.zeros((n_rows, width), bool)
    for r, i in enumerate(rows):
        ids[r, :len(seqs[i])] = seqs[i]
        mask[r, :len(seqs[i])] = True
        target[r, (starts[i] if starts is not None else 0):len(seqs[i])] = True
    return ids, mask, target


@jax.jit
def _continuation(decoder: M.Decoder, ids: jax.Array, mask: jax.Array, target: jax.Array):
    """Per row: sum of log p(ids[t] | ids[:t]) over positions t with target[t], and their count."""
    logits, _ = decoder(ids, M.positions_from_mask(mask), mask)
    logits = logits[:, :-1]
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    scored = target[:, 1:]
    return jnp.sum(jnp.where(scored, logp, 0.0), axis=-1), jnp.sum(scored, axis=-1)


@jax.jit
def _next_token(decoder: M.Decoder, ids: jax.Array, mask: jax.Array, candidates: jax.Array) -> jax.Array:
    """Per row: log-probabilities of `candidates` as the token after the row's last real token."""
    logits, _ = decoder(ids, M.positions_from_mask(mask), mask)
    last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
    final = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(final, axis=-1)[:, candidates]


def continuation_logprobs(decoder: M.Decoder, seqs: Sequence[Sequence[int]], starts: Sequence[int], *,
                          batch_tokens: int = 4096, desc: str = "scoring",
                          keep: partial.Partial | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log-probabilities of tokens `seqs[i][starts[i]:]` given the tokens before them, and their count."""
    check_lengths(seqs, decoder.cfg.max_position_embeddings, "sequence")
    lengths = np.array([len(s) for s in seqs])
    total, count = np.zeros(len(seqs)), np.zeros(len(seqs), np.int64)
    keys = [partial.digest([list(q), int(a)]) for q, a in zip(seqs, starts)] if keep else None
    for width, n_rows, rows in tqdm(list(_batches(lengths, batch_tokens)), desc=desc, unit="batch"):
        done = keep.get([keys[i] for i in rows]) if keep else None
        if done is None:
            s, c = _continuation(decoder, *_pad(seqs, rows, width, n_rows, starts))
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
    lengths = np.array([len(s) for s in seqs])
    out = np.zeros((len(seqs), len(candidates)))
    cand = jnp.asarray(list(candidates), jnp.int32)
    keys = [partial.digest([list(q), list(candidates)]) for q in seqs] if keep else None
    for width, n_rows, rows in tqdm(list(_batches(lengths, batch_tokens)), desc=desc, unit="batch"):
        done = keep.get([keys[i] for i in rows]) if keep else None
        if done is None:
            ids, mask, _ = _pad(seqs, rows, width, n_rows)
            done = np.asarray(_next_token(decoder, ids, mask, cand))[:len(rows)].tolist()
            if keep:
                keep.add([keys[i] for i in rows], done)
        out[rows] = done
    return out
