"""Core model: logit parity with transformers' PyTorch classes, HF import/export, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jax_implicit import convert
from jax_implicit import model as M

# One batch shape for all tiny checks (few compilations): 3 rows, left padding of 0, 3 and 7.
LENGTHS = (12, 9, 5)


def padded_batch(vocab: int, lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), 2, np.int32)
    mask = np.zeros_like(ids, bool)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = rng.integers(3, vocab, n)
        mask[r, width - n:] = True
    return ids, mask


def torch_logits(hf_dir, ids, mask):
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pos = np.asarray(M.positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.numpy()


@jax.jit
def jax_logits(decoder, ids, mask):
    return decoder(ids, M.positions_from_mask(mask), mask)[0]


@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa_tied", "olmo", "olmo_clip"])
def test_tiny_parity_with_left_padding(tiny_hf, kind):
    path = tiny_hf(kind)
    ids, mask = padded_batch(256)
    ref = torch_logits(path, ids, mask)
    out = np.asarray(jax_logits(convert.load_hf(path), ids, mask))
    assert np.abs(out - ref)[mask].max() <= 1e-4
    # each left-padded row equals the same prompt run alone, unpadded
    for r, n in enumerate(LENGTHS):
        alone = np.asarray(jax_logits(convert.load_hf(path), ids[r:r + 1, -n:], mask[r:r + 1, -n:]))
        np.testing.assert_allclose(out[r, -n:], alone[0], atol=1e-5)


def test_clip_qkv_matters(tiny_hf):
    """OLMo's clipping is really applied: the clipped model differs from the unclipped one."""
    ids, mask = padded_batch(256)
    a = jax_logits(convert.load_hf(tiny_hf("olmo")), ids, mask)
    b = jax_logits(convert.load_hf(tiny_hf("olmo_clip")), ids, mask)
    assert float(jnp.abs(a - b).max()) > 1e-2


def test_kv_cache_prefill_then_steps_equals_full_forward(tiny_hf):
    dec = convert.load_hf(tiny_hf("llama_gqa_tied"))
    ids, mask = padded_batch(256)
    full = np.asarray(jax_logits(dec, ids, mask))
    split = 8  # prefill 8 tokens, then one token at a time into a cache bigger than the sequence
    cache = M.KVCache.init(dec.cfg, ids.shape[0], 16)
    pos = M.positions_from_mask(jnp.asarray(mask))
    step = jax.jit(lambda d, t, p, m, c: d(t, p, m, c))
    logits, cache = step(dec, ids[:, :split], pos[:, :split], mask[:, :split], cache)
    got = [np.asarray(logits)]
    for i in range(split, ids.shape[1]):
        logits, cache = step(dec, ids[:, i:i + 1], pos[:, i:i + 1], mask[:, i:i + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got[mask], full[mask], atol=1e-5)
    assert int(cache.index) == ids.shape[1]


def test_cached_attention_reads_the_cache_as_the_dots_left_operand():
    """The decoding step's key dot keeps the cache as its left operand, (S, Dh) x (Dh, G*T) per (batch, KV head),
    which XLA:CPU streams at twice the speed of the transposed form; it is easily folded back by reordering the
    scale and the transpose. The result equals plain grouped attention."""
    B, S, K, G, Dh = 2, 48, 3, 3, 64
    rng = np.random.default_rng(0)
    shapes = (B, 1, K * G, Dh), (B, K, S, Dh), (B, K, S, Dh)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    attend = jnp.asarray(rng.random((B, 1, S)) < 0.8)
    cached = jax.jit(lambda q, k, v: M._cached_attention(q, k, v, attend, Dh))
    dots = [line for line in cached.lower(q, k, v).compile().as_text().splitlines() if " dot(" in line]
    assert any(f"f32[{B},{K},{S},{G}]" in line for line in dots), dots
    plain = M._attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), attend, Dh)
    np.testing.assert_allclose(cached(q, k, v), plain, atol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny_hf):
    """bf16 params and compute (norms, softmax and logits stay f32). Documented tolerance: max error
    within 5% of the largest |logit|, mean error within 1%, argmax agreeing on 90% of positions."""
    path = tiny_hf("llama_gqa_tied")
    ids, mask = padded_batch(256)
    f32 = np.asarray(jax_logits(convert.load_hf(path), ids, mask))
    bf16 = jax_logits(convert.load_hf(path, param_dtype="bfloat16", dtype="bfloat16"), ids, mask)
    assert bf16.dtype == jnp.float32
    err = np.abs(np.asarray(bf16) - f32)[mask]
    scale = np.abs(f32[mask]).max()
    assert err.max() <= 0.05 * scale and err.mean() <= 0.01 * scale, (err.max(), err.mean(), scale)
    assert (np.asarray(bf16).argmax(-1) == f32.argmax(-1))[mask].mean() > 0.9


def test_round_trip_sharded_export_is_exact(tiny_hf, tmp_path):
    src = tiny_hf("llama_mha")
    out = convert.export_hf(convert.load_hf(src), tmp_path / "export", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded, with an index
    ids, mask = padded_batch(256)
    np.testing.assert_array_equal(torch_logits(out, ids, mask), torch_logits(src, ids, mask))
    # and our own loader reads the sharded export back
    np.testing.assert_array_equal(np.asarray(jax_logits(convert.load_hf(out), ids, mask)),
                                  np.asarray(jax_logits(convert.load_hf(src), ids, mask)))


def test_load_pytorch_bin(tiny_hf, tmp_path):
    """Legacy `.bin` checkpoints load through torch.load(weights_only=True)."""
    src = tiny_hf("olmo")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict(),
               tmp_path / "pytorch_model.bin")
    ids, mask = padded_batch(256)
    np.testing.assert_array_equal(np.asarray(jax_logits(convert.load_hf(tmp_path), ids, mask)),
                                  np.asarray(jax_logits(convert.load_hf(src), ids, mask)))


def test_bfloat16_and_float16_safetensors_read_exactly(tiny_hf, tmp_path):
    """Half-precision files (most hub checkpoints) are memory-mapped with numpy dtypes, each value as torch has it."""
    from jax_implicit.convert import _Reader

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf("llama_gqa_tied"), dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        out = tmp_path / str(dtype)
        hf.to(dtype).save_pretrained(out)
        reader, state = _Reader(out), hf.state_dict()
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
            np.testing.assert_array_equal(np.asarray(reader.read(name), np.float32), state[name].float().numpy())


# ----------------------------------------------------------------------------- bad input


def _edit_checkpoint(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_hf, tmp_path):
    path = _edit_checkpoint(tiny_hf("llama_mha"), tmp_path / "m",
                            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.load_hf(path)


def test_wrong_shape_and_unexpected_tensor_are_named(tiny_hf, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:32]
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)

    path = _edit_checkpoint(tiny_hf("llama_mha"), tmp_path / "m", edit)
    with pytest.raises(ValueError) as err:
        convert.load_hf(path)
    assert "model.layers.0.self_attn.k_proj.weight has shape (32, 64), expected (64, 64)" in str(err.value)
    assert "unexpected tensor model.layers.0.extra.weight" in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3' is not supported"),
])
def test_unrepresentable_config_is_an_error(tiny_hf, tmp_path, change, message):
    path = shutil.copytree(tiny_hf("llama_mha"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert.load_hf(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        convert.load_hf(tmp_path / "does-not-exist")


def test_failed_export_leaves_nothing_behind(tiny_hf, tmp_path, monkeypatch):
    dec = convert.load_hf(tiny_hf("llama_mha"))
    good = convert.export_hf(dec, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(M, "to_hf_config", broken)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        convert.export_hf(dec, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        convert.export_hf(dec, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the old export is untouched
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


# ----------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_real_weights_parity_and_round_trip(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    prompts = ["<|user|>\nWhat is the capital of France?\n<|assistant|>\n",
               "The quick brown fox", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "Write a short poem about the sea."]
    batch = tok(prompts, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)
    ref = torch_logits(smollm2_dir, ids, mask)
    dec = convert.load_hf(smollm2_dir)
    out = np.asarray(jax_logits(dec, ids, mask))
    assert np.abs(out - ref)[mask].max() <= 1e-3
    assert (out.argmax(-1) == ref.argmax(-1))[mask].all()
    exported = convert.export_hf(dec, tmp_path / "smol", tokenizer_dir=smollm2_dir)
    np.testing.assert_array_equal(torch_logits(exported, ids, mask), ref)
    assert AutoTokenizer.from_pretrained(exported)(prompts[0])["input_ids"] == tok(prompts[0])["input_ids"]
