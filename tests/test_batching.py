"""The one padding policy (batching.py): padded lengths, padding on either side, packing by length on real
ranking data, and decoding's left-padded prompts. No JAX compilation here."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from jax_implicit import batching, serving
from jax_implicit.evaluate import ranking


def test_sizes_split_each_doubling_in_equal_steps():
    assert batching.sizes(32, 256) == (32, 48, 64, 96, 128, 192, 256)
    assert batching.sizes(64, 100) == (64, 96, 100)  # the cap is always the last length
    assert batching.sizes(256, 128) == (128,)
    assert [batching.padded_length(n, (32, 48, 64)) for n in (0, 32, 33, 49, 64)] == [32, 32, 48, 64, 64]
    with pytest.raises(ValueError, match="65 tokens is longer than the longest padded length 64"):
        batching.padded_length(65, (32, 48, 64))


def test_pad_right_and_left():
    seqs = [[1, 2, 3], [], [4]]
    assert batching.pad(seqs, 4, 5).tolist() == [[1, 2, 3, 0, 0], [0] * 5, [4, 0, 0, 0, 0], [0] * 5]
    assert batching.pad(seqs, 3, 4, left=True, fill=9).tolist() == [[9, 1, 2, 3], [9] * 4, [9, 9, 9, 4]]
    mask = batching.pad(batching.real([3, 0, 1]), 3, 4, dtype=bool)
    assert mask.sum(1).tolist() == [3, 0, 1] and mask[0, :3].all()


@pytest.fixture(scope="module")
def ranking_lengths(smollm2_dir, data_dir):
    """Token counts of the sequences ranking scores for 300 dolly examples x (1 + 5 random responses)."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = ranking.load_examples(str(data_dir / "dolly" / "dolly_train.json"), 300)
    others = ranking.pairings(len(rows), 5, seed=0)
    pairs = [(i, i) for i in range(len(rows))] + [(i, int(j)) for i in range(len(rows)) for j in others[i]]
    texts = [ranking.user_text(rows[i]) for i, _ in pairs]
    return np.array([min(2048, len(ranking.encode(tok, t, rows[j]["output"], "user_assistant")[0]))
                     for t, (_, j) in zip(texts, pairs)])


@pytest.mark.parametrize("budget", [1024, 4096, 16384])
def test_packing_covers_every_sequence_within_budget_with_little_padding(ranking_lengths, budget):
    lengths = ranking_lengths
    sizes = batching.sizes(32, 2048)
    batches = batching.pack(lengths, budget, sizes)
    assert sorted(np.concatenate([b.index for b in batches]).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert b.width in sizes and len(b.index) <= b.rows and lengths[b.index].max() <= b.width
        assert b.rows * b.width <= budget or b.rows == 1
    padded = sum(b.rows * b.width for b in batches)
    overhead = padded / lengths.sum() - 1
    print(f"budget {budget}: {len(lengths)} sequences of {lengths.min()}..{lengths.max()} tokens, "
          f"{len(batches)} batches, {len({(b.rows, b.width) for b in batches})} shapes, padding {overhead:.1%}")
    assert overhead < 0.3  # power-of-two lengths, one shape per length: 45-50% on the same data
    assert len({(b.rows, b.width) for b in batches}) <= len(sizes) + 2
    again = batching.pack(lengths, budget, sizes)  # a resumed run finds its kept batches again
    assert all(a[:2] == b[:2] and np.array_equal(a.index, b.index) for a, b in zip(again, batches))


def test_decoding_prompts_left_padded():
    prompts = [serving.Prompt(list(range(1, 11)), 3), serving.Prompt(list(range(1, 21)), 5)]
    ids, mask, seen = batching.pad_prompts(prompts, 3, 16, pad_id=0)
    assert ids.shape == (3, 24)  # 20 tokens: the padded length after 16
    assert ids[1].tolist() == [0] * 4 + list(range(1, 21)) and ids[0].tolist() == [0] * 14 + list(range(1, 11))
    assert seen[0].tolist() == [False] * 17 + [True] * 7 and seen[1].tolist() == [False] * 9 + [True] * 15
    assert mask[:, -1].all() and np.array_equal(ids[2], ids[0])  # the dummy row repeats the first prompt
