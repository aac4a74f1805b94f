"""Gemma 3 (text) in the shared decoder: parity with transformers' Gemma3ForCausalLM on a tiny random
config whose sliding window is shorter than the test sequence and on the real Gemma-3-270M weights,
the KV cache beyond the window, HF export round trip, sharding, config errors, greedy decoding against
transformers' `generate`, and the rule table on Gemma's tokenizer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_model import LENGTHS, jax_logits, padded_batch, torch_logits
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from jax_implicit import convert, decode, rules
from jax_implicit import model as M
from jax_implicit.prompts import generation_prompt
from tolerances import assert_reorder_close

WINDOW = 4  # shorter than the 12-token test rows: most positions lose keys to the window
TINY_GEMMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny random Gemma3ForCausalLM saved as a float32 HF folder."""
    cfg = AutoConfig.for_model("gemma3_text", **TINY_GEMMA)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init is too small to make logits differ much; widen it
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(-0.5, 0.5)  # norms: 1 + w in [0.5, 1.5]
    out = tmp_path_factory.mktemp("tiny_gemma")
    hf.save_pretrained(out)
    return out


def test_tiny_gemma_parity_with_window_shorter_than_sequence(tiny_gemma):
    dec = convert.load_hf(tiny_gemma)
    assert dec.cfg.sliding_layers == (True, False, True) and dec.cfg.rope_bases == (10000.0, 100.0)
    ids, mask = padded_batch(256)
    ref = torch_logits(tiny_gemma, ids, mask)
    out = np.asarray(jax_logits(dec, ids, mask))
    assert np.abs(out - ref)[mask].max() <= 1e-4
    for r, n in enumerate(LENGTHS):  # each left-padded row equals the same prompt run alone
        alone = np.asarray(jax_logits(dec, ids[r:r + 1, -n:], mask[r:r + 1, -n:]))
        np.testing.assert_allclose(out[r, -n:], alone[0], atol=1e-5)
    # the window really cuts: a window wider than the rows changes exactly the positions >= WINDOW
    dec.cfg = dec.cfg.replace(sliding_window=64)
    wide = np.asarray(jax_logits(dec, ids, mask))
    pos = np.asarray(M.positions_from_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(wide[mask & (pos < WINDOW)], out[mask & (pos < WINDOW)])
    assert np.abs(wide - out).max(-1)[mask & (pos >= WINDOW)].min() > 1e-3


def test_tiny_gemma_kv_cache_beyond_window_equals_full_forward(tiny_gemma):
    dec = convert.load_hf(tiny_gemma)
    ids, mask = padded_batch(256)
    full = np.asarray(jax_logits(dec, ids, mask))
    cuts = [0, 3, 5, *range(6, ids.shape[1] + 1)]  # prefill 3, a 2-token chunk, then single steps past the window
    cache = M.KVCache.init(dec.cfg, ids.shape[0], 16)
    pos = M.positions_from_mask(jnp.asarray(mask))
    step = jax.jit(lambda d, t, p, m, c: d(t, p, m, c))
    got = []
    for a, b in zip(cuts, cuts[1:]):
        logits, cache = step(dec, ids[:, a:b], pos[:, a:b], mask[:, a:b], cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1)[mask], full[mask], atol=1e-5)
    assert int(cache.index) == ids.shape[1]


def test_tiny_gemma_round_trip_through_hf_export(tiny_gemma, tmp_path):
    dec = convert.load_hf(tiny_gemma)
    out = convert.export_hf(dec, tmp_path / "export")
    assert M.from_hf_config(out) == dec.cfg
    ids, mask = padded_batch(256)
    np.testing.assert_array_equal(torch_logits(out, ids, mask), torch_logits(tiny_gemma, ids, mask))
    np.testing.assert_array_equal(np.asarray(jax_logits(convert.load_hf(out), ids, mask)),
                                  np.asarray(jax_logits(dec, ids, mask)))


def test_gemma_parameters_declare_logical_axes():
    cfg = M.from_hf_config({"model_type": "gemma3_text", **TINY_GEMMA})
    axes = M.logical_axes(M.abstract(cfg))["layers"]
    assert axes["q_norm"] == axes["k_norm"] == ("layers", "head_dim")
    assert axes["attn_post_norm"] == axes["mlp_post_norm"] == ("layers", "norm")
    assert "lm_head" not in M.logical_axes(M.abstract(cfg))  # tied


def test_tiny_gemma_sharded_fsdp_tp_equals_one_device(tiny_gemma):
    """The new parameters' logical axes place them on a mesh (tensor=4 splits heads, MLP, vocabulary)."""
    from jax_implicit import pinning
    from jax_implicit.sharding import Sharder

    sh = Sharder.from_config(dict(data=1, fsdp=2, tensor=4, rules="fsdp_tp"))
    sharded = sh.load_hf(tiny_gemma)
    assert sharded.layers.q_norm[...].sharding.is_fully_replicated  # head_dim and norm stay whole
    assert not sharded.layers.w_gate[...].sharding.is_fully_replicated
    ids, mask = padded_batch(256)
    with pinning.active(sh):
        on_mesh = jax_logits(sharded, ids, mask)
    assert_reorder_close(on_mesh, jax_logits(convert.load_hf(tiny_gemma), ids, mask))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma3", "text_config": {}}, "'gemma3' is the multimodal Gemma 3 checkpoint"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "'linear' on full_attention layers is not supported"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types has 2 entries for num_layers=3"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "unknown \\['chunked_attention'\\]"),
    ({"sliding_window": None}, "sliding_attention layers need sliding_window > 0"),
])
def test_unrepresentable_gemma_config_is_an_error(tiny_gemma, tmp_path, change, message):
    cfg = json.loads((tiny_gemma / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        convert.load_hf(tmp_path)


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma3_270m_dir):
    return AutoTokenizer.from_pretrained(gemma3_270m_dir, padding_side="left")


@pytest.fixture(scope="module")
def gemma_hf(gemma3_270m_dir):
    return AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma_decoder(gemma3_270m_dir):
    return convert.load_hf(gemma3_270m_dir)


@pytest.fixture(scope="module")
def long_prompt(data_dir, gemma_tokenizer) -> str:
    """A real LIMA conversation cut to 600 Gemma tokens: longer than the 512-token sliding window."""
    for line in (data_dir / "lima" / "lima_data.jsonl").read_text().splitlines():
        user, assistant = (m["content"] for m in json.loads(line)["messages"][:2])
        ids = gemma_tokenizer(f"<|user|>\n{user}\n<|assistant|>\n{assistant}", add_special_tokens=False)["input_ids"]
        if len(ids) >= 600:
            return gemma_tokenizer.decode(ids[:600])
    raise AssertionError("no LIMA conversation reaches 600 Gemma tokens")


SHORT_PROMPTS = [generation_prompt("What is the capital of France?"), "The quick brown fox",
                 "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


@pytest.mark.slow
def test_gemma3_270m_real_weights_parity(gemma_hf, gemma_decoder, gemma_tokenizer, long_prompt):
    assert gemma_decoder.cfg.sliding_window == 512 and gemma_decoder.cfg.sliding_layers.count(False) == 3
    for batch in (SHORT_PROMPTS, [long_prompt]):
        enc = gemma_tokenizer(batch, return_tensors="np", padding=True)
        ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
        pos = M.positions_from_mask(jnp.asarray(mask))
        with torch.no_grad():
            ref = gemma_hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                           position_ids=torch.tensor(np.asarray(pos)).long()).logits.numpy()
        out = np.asarray(jax_logits(gemma_decoder, ids, mask))
        assert np.abs(out - ref)[mask].max() <= 1e-3
        assert (out.argmax(-1) == ref.argmax(-1))[mask].all()
    assert ids.shape[1] > 512  # the long prompt crossed the window


@pytest.mark.slow
def test_gemma3_270m_greedy_decoding_matches_transformers_generate(gemma_hf, gemma_decoder, gemma_tokenizer,
                                                                   long_prompt):
    """Ours batched and left-padded (the long row crosses the window while prefilling and decoding);
    transformers one prompt at a time, unpadded."""
    prompts, new = [SHORT_PROMPTS[0], SHORT_PROMPTS[2], long_prompt], 20
    enc = gemma_tokenizer(prompts, return_tensors="np", padding=True)
    tokens, lengths = decode.generate(gemma_decoder, enc["input_ids"], enc["attention_mask"].astype(bool),
                                      max_new_tokens=new, eos_ids=gemma_decoder.cfg.eos_token_ids)
    assert (np.asarray(lengths) == new).all()  # no row stops early: every row compares `new` tokens
    for r, prompt in enumerate(prompts):
        ids = gemma_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = gemma_hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        assert np.asarray(tokens[r, :int(lengths[r])]).tolist() == ref.tolist(), (r, prompt[-40:])


def test_rule_table_maps_onto_gemma_tokenizer(gemma3_270m_dir, gemma_tokenizer):
    """Every string of the paper's rule table is one Gemma token, the one its tokenizer emits."""
    strings = {name: s for name, (s, _) in rules.TOKENS.items()}
    found, missing = rules.token_ids(gemma_tokenizer, strings, 262144)
    print(f"rule strings that are not single Gemma tokens: {[strings[n] for n in missing]}")
    assert missing == []
    for name, i in found.items():
        plain = strings[name].replace(rules.SPACE, " ")
        assert gemma_tokenizer(plain, add_special_tokens=False)["input_ids"] == [i], name
    cfg = M.from_hf_config(gemma3_270m_dir)
    tables = rules.build(rules.default_config(), gemma_tokenizer, cfg.vocab_size, cfg.eos_token_ids[0])
    offsets = np.asarray(tables.offsets)
    assert {i: offsets[i] for i in found.values()} == {found[n]: w for n, (_, w) in rules.TOKENS.items()}
    assert np.count_nonzero(offsets) == len(strings) and np.asarray(tables.eos)[1] == 1.0
