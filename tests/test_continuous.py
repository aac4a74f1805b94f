"""Continuous batching (`decode._serve`, behind `generate_prompts`): the same tokens as decoding each
prompt alone, with and without the rules, for prompts of very different lengths and stopping points;
refills happen inside one compiled program; sampling is keyed by the instruction, not the slot."""

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from jax_implicit import batching, convert, decode, serving
from jax_implicit import rules as R

NEW = 12
BUCKET = 64
# One width bucket, very different lengths: the queue is longer than the slots, so slots are refilled.
PROMPTS = ["Hi.", "Name a colour.", "Write one long sentence about the sea, the wind, the boats and the gulls.",
           "Why?", "List three fruits, then three vegetables, then three grains, in that order.", "Count."]


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    dec = convert.load_hf(tiny_smol_dir)
    tables = R.build(R.default_config(), tok, dec.cfg.vocab_size, tok.eos_token_id)
    return tok, dec, [serving.encode(tok, p) for p in PROMPTS], tables


def alone(dec, prompt, eos, tables, max_new_tokens=NEW, **kw):
    """One prompt decoded by itself (batch 1, the static-batch decoder), as token ids without the EOS."""
    ids, mask, seen = batching.pad_prompts([prompt], 1, 16, dec.cfg.pad_token_id)
    tokens, lengths = decode.generate(dec, ids, mask, seen_mask=seen, max_new_tokens=max_new_tokens, rules=tables,
                                      eos_ids=eos, **kw)
    row = np.asarray(tokens)[0, :int(lengths[0])].tolist()
    return row[:-1] if row and row[-1] in eos else row


def served(dec, tok, encoded, tables, slots, bucket=BUCKET, **kw):
    """Every prompt's response through `generate_prompts` (continuous batching)."""
    return serving.generate_prompts(dec, tok, encoded, max_new_tokens=NEW, rules=tables, batch_size=slots,
                                   bucket=bucket, **kw)


@pytest.fixture(scope="module")
def eos(tiny):
    """A stop id that greedy decoding hits at different steps in different rows (and never in some)."""
    _, dec, encoded, _ = tiny
    free = [alone(dec, p, (), None) for p in encoded]
    counts = {}
    for row in free:
        for t in set(row[1:]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)
    assert 0 < counts[stop] < len(PROMPTS)
    return (stop,)


@pytest.mark.parametrize("with_rules", [False, True])
def test_continuous_equals_each_prompt_alone(tiny, eos, with_rules, monkeypatch):
    tok, dec, encoded, tables = tiny
    tables = tables if with_rules else None
    monkeypatch.setattr(serving, "eos_ids_for", lambda cfg, tokenizer: eos)
    want = [alone(dec, p, eos, tables) for p in encoded]
    stops = {len(w) for w in want}
    assert len(stops) > 2 and NEW in stops  # rows stop early at different steps, and some run to the limit
    got = served(dec, tok, encoded, tables, slots=2)
    assert got == [tok.decode(w, skip_special_tokens=True) for w in want]


# Single words: prompts of at most 16 tokens, most of whose responses stop early while slots keep refilling.
WORDS = "Red Blue Go Sing Now Stop Run Yes No Hi Why Count Up Down Left Right Cat Dog Sun Moon Tree Sea Sky Rain"


@pytest.mark.parametrize("case", ["wide prompts wait", "the cache shrinks"])
def test_segments_and_widths_in_one_call(tiny, eos, case, monkeypatch):
    """Segments from 17 slots (`SERVE_FIRST_SEGMENT` set to 16, and the narrowest width, 16, plus the first new
    token), 4 slots, bucket 8, one call; each case's phases were checked by printing them. `wide prompts
    wait`: PROMPTS pad to 16, 24 and 32 and each is prefilled at its own width, in chunks of 8; the fourth
    (24) finds a free slot at the first step but waits for the cache to grow. `the cache shrinks`: 24
    one-word prompts; the cache grows to 34 slots and goes back to 17 between them, then to the full 40,
    and the last row finishes in the drain's one slot (4 // 4). Every response equals decoding the prompt
    alone."""
    tok, dec, encoded, tables = tiny
    new = NEW if case == "wide prompts wait" else 24
    if case == "the cache shrinks":
        encoded = [serving.encode(tok, w + ".") for w in WORDS.split()]
    monkeypatch.setattr(serving, "eos_ids_for", lambda cfg, tokenizer: eos)
    monkeypatch.setattr(decode, "SERVE_FIRST_SEGMENT", 16)
    own = [batching.prompt_width(n, 8) for n in sorted(len(p.ids) for p in encoded)]
    assert (own[:3] == [16] * 3 and own[3] > 16 and len(set(own)) == 3) if case == "wide prompts wait" else (
        len(own) == 24 and set(own) == {16})
    want = [alone(dec, p, eos, tables, max_new_tokens=new) for p in encoded]
    real, calls = decode.serve_queue, []
    monkeypatch.setattr(decode, "serve_queue", lambda *a, **k: calls.append(k["widths"]) or real(*a, **k))
    got = serving.generate_prompts(dec, tok, encoded, max_new_tokens=new, rules=tables, batch_size=4, bucket=8)
    assert got == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert calls == [tuple(sorted(set(own)))]


def test_chunks_of_padding_alone_are_skipped(tiny, eos, monkeypatch):
    """Widths 16, 24 and 48 at bucket 8 (chunks of 8): the long prompt's width leaves its first chunk all
    padding, which `_prefill_row` skips; its tokens, and the others', still equal decoding it alone."""
    tok, dec, encoded, tables = tiny
    long = serving.encode(tok, "Describe, in two or three short sentences, how a lighthouse keeper spent a long "
                               "winter night on the rocky island.")
    encoded = [encoded[0], long, encoded[1]]
    assert [batching.prompt_width(len(p.ids), 8) for p in encoded] == [16, 48, 24]
    assert batching.prompt_width(len(long.ids), 8) - (len(long.ids) - 1) >= 8
    monkeypatch.setattr(serving, "eos_ids_for", lambda cfg, tokenizer: eos)
    want = [alone(dec, p, eos, tables) for p in encoded]
    assert served(dec, tok, encoded, tables, slots=2, bucket=8) == [tok.decode(w, skip_special_tokens=True)
                                                                     for w in want]


def test_refills_do_not_recompile(tiny):
    tok, dec, encoded, tables = tiny
    served(dec, tok, encoded[:4], tables, slots=2)
    compiled = decode._serve_jit._cache_size()
    served(dec, tok, encoded[2:], tables, slots=2)  # other prompts, other refill points: same shapes
    assert decode._serve_jit._cache_size() == compiled


def test_calls_of_a_few_steps_give_the_same_tokens_from_one_program_without_host_callbacks(tiny, eos, monkeypatch):
    """`serve_queue` decodes in calls of `STEPS_PER_CALL` steps (here 3), reporting the tokens each produced:
    the responses equal one call's, the reports add up to every token decoded (EOS included), every call runs
    the same compiled program, and that program calls no host function (one would keep it out of JAX's
    persistent compilation cache)."""
    tok, dec, encoded, tables = tiny
    monkeypatch.setattr(serving, "eos_ids_for", lambda cfg, tokenizer: eos)
    whole = served(dec, tok, encoded, tables, slots=2)
    monkeypatch.setattr(decode, "STEPS_PER_CALL", 3)
    real, calls, made = decode._serve_jit, [], []
    monkeypatch.setattr(decode, "_serve_jit", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    compiled = real._cache_size()
    assert served(dec, tok, encoded, tables, slots=2, on_tokens=made.append) == whole
    assert len(calls) > 4 and len(made) == len(calls) and real._cache_size() == compiled + 1
    rows = {k: r for group in serving.serve(dec, dict(enumerate(encoded)), eos, max_new_tokens=NEW, rules=tables,
                                            batch_size=2, bucket=BUCKET) for k, r in group.items()}
    assert sum(made) == sum(len(r) + (len(r) < NEW) for r in rows.values())
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a,
                          calls[0][0])
    assert "callback" not in real.lower(*shapes, **calls[0][1]).as_text()


def test_sampling_is_keyed_by_instruction(tiny):
    tok, dec, encoded, tables = tiny
    kw = dict(temperature=2.0, seed=3)
    two = serving.generate_prompts(dec, tok, encoded, max_new_tokens=NEW, rules=tables, batch_size=2, bucket=BUCKET,
                                  **kw)
    three = serving.generate_prompts(dec, tok, encoded, max_new_tokens=NEW, rules=tables, batch_size=3,
                                    bucket=BUCKET, **kw)
    assert two == three and len(set(two)) > 1
    resumed = serving.generate_prompts(dec, tok, encoded, max_new_tokens=NEW, rules=tables, batch_size=2,
                                      bucket=BUCKET, done={0: two[0], 4: two[4]}, **kw)
    assert resumed == two
    other = serving.generate_prompts(dec, tok, encoded, max_new_tokens=NEW, rules=tables, batch_size=2,
                                    bucket=BUCKET, temperature=2.0, seed=4)
    assert other != two
