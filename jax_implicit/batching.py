"""Fixed-shape batches of token sequences: the one padding policy of training, scoring and decoding.

Every compiled program is specialised to its input shapes, so sequences are padded to a few lengths
(`sizes`): from a smallest length, each doubling is split into `STEPS` equal steps (64, 96, 128, 192,
256, ...), so a sequence is padded by less than 1/STEPS of its length while a whole dataset compiles to
one program per length used. Rows sorted by length fill batches up to a token budget (`pack`), and a
batch's rows and columns are padded on the right (training, scoring) or on the left (decoding, whose
prompts must end in their last real token) with `pad`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from jax_implicit.data import Examples

STEPS = 2  # padded lengths per doubling: padding < 1/2 of a length; ~1/5 on real ranking data (tests/test_batching.py)


def _rungs(smallest: int) -> Iterator[int]:
    base = smallest
    while True:
        yield from (base + base * j // STEPS for j in range(STEPS))
        base *= 2


def sizes(smallest: int, largest: int) -> tuple[int, ...]:
    """Every padded length from `smallest` up to `largest` (always the last): one compilation each."""
    return (*itertools.takewhile(lambda r: r < largest, _rungs(smallest)), largest)


def padded_length(n: int, sizes: Sequence[int]) -> int:
    """The shortest of `sizes` (ascending) that holds `n` tokens."""
    if n > sizes[-1]:
        raise ValueError(f"a sequence of {n} tokens is longer than the longest padded length {sizes[-1]}")
    return next(s for s in sizes if s >= n)


def pad(seqs: Sequence[Sequence], rows: int, width: int, *, left: bool = False, fill=0,
        dtype=np.int32) -> np.ndarray:
    """(rows, width) array holding seqs[r] in row r, at its start (or its end with `left`); the rest is `fill`."""
    out = np.full((rows, width), fill, dtype)
    for r, s in enumerate(seqs):
        out[r, slice(width - len(s), width) if left else slice(0, len(s))] = s
    return out


def real(lengths: Sequence[int]) -> list[np.ndarray]:
    """All-True rows of the given lengths: `pad` makes them the mask of real tokens."""
    return [np.ones(n, bool) for n in lengths]


# ----------------------------------------------------------------------------- scoring: packed by length


class Batch(NamedTuple):
    width: int  # padded length
    rows: int  # padded number of rows (the first len(index) are real)
    index: np.ndarray  # the sequences in the batch, shortest first


def _rows(n: int, width: int, budget: int) -> int:
    """A batch of `width` holds budget // width rows; a partial one is padded only to a power of two rows
    (few shapes, and 3 sequences do not pay for 64 rows)."""
    return min(max(1, budget // width), 1 << (n - 1).bit_length())


def pack(lengths: Sequence[int], budget: int, sizes: Sequence[int]) -> list[Batch]:
    """Batches of at most `budget` tokens (rows x padded length; one row at least) holding every sequence.

    Sequences are taken shortest first; each joins the open batch if the batch, padded to the new
    sequence's length, still fits the budget, else the batch closes. So a batch is full unless the
    next length does not fit it, and a length's last few sequences ride along in the next length's batch
    instead of padding a batch of their own with empty rows. The same lengths always give the same batches.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    widths = [padded_length(int(n), sizes) for n in lengths[order]]
    out, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or (k - start + 1) * widths[k] > budget:
            out.append(Batch(widths[k - 1], _rows(k - start, widths[k - 1], budget), order[start:k]))
            start = k
    return out


# ----------------------------------------------------------------------------- training: micro-batches


def epoch_order(n: int, key: np.ndarray, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by the run's PRNG key and the epoch."""
    return np.random.default_rng([*np.asarray(key, np.uint32).tolist(), epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    return math.ceil(n / global_batch)


def micro_batches(examples: Examples, indices: np.ndarray, micro: int, sizes: Sequence[int]) -> list[dict]:
    """One global batch as fixed-shape micro-batches: sorted by length, each padded to its length of `sizes`.

    Rows past the last example are all padding (mask False), so every micro-batch has `micro` rows.
    Returns dicts of numpy arrays: tokens (micro, L) int32, mask (micro, L) bool, loss (micro, L) bool.
    """
    lengths = examples.lengths[indices]
    ordered = indices[np.argsort(lengths, kind="stable")]
    out = []
    for lo in range(0, len(ordered), micro):
        chunk = ordered[lo:lo + micro]
        width = padded_length(int(examples.lengths[chunk].max()), sizes)
        out.append(dict(tokens=pad([examples.ids[i] for i in chunk], micro, width),
                        mask=pad(real(examples.lengths[chunk]), micro, width, dtype=bool),
                        loss=pad([examples.loss[i] for i in chunk], micro, width, dtype=bool)))
    return out


# ----------------------------------------------------------------------------- decoding: left-padded prompts


class Prompt(Protocol):
    ids: list[int]
    seen_from: int  # first token the diversity rule counts


def prompt_width(n: int, bucket: int) -> int:
    """The padded width of a prompt of `n` tokens: the padded lengths from `bucket` up (no cap)."""
    return next(r for r in _rungs(bucket) if r >= n)


def pad_prompts(batch: Sequence[Prompt], rows: int, bucket: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """(ids, mask, seen) of prompts left-padded to `prompt_width` of the longest and to `rows` rows."""
    return left_pad(batch, rows, prompt_width(max(len(p.ids) for p in batch), bucket), pad_id)


def left_pad(batch: Sequence[Prompt], rows: int, width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """(ids, mask, seen) of prompts left-padded to `width` columns and `rows` rows; dummy rows repeat the
    first prompt, since every row must end in a real token."""
    prompts = [batch[r] if r < len(batch) else batch[0] for r in range(rows)]
    return (pad([p.ids for p in prompts], rows, width, left=True, fill=pad_id),
            pad(real(len(p.ids) for p in prompts), rows, width, left=True, dtype=bool),
            pad([np.arange(len(p.ids)) >= p.seen_from for p in prompts], rows, width, left=True, dtype=bool))
