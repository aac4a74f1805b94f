"""QLoRA's weight quantisation: NF4 with double quantisation against bitsandbytes' own CPU
`quantize_4bit`/`dequantize_4bit`, int8's error bound, and the quantised decoder's forward.

Tolerances of the QLoRA forward (documented in NOTES-lora.md): on the tiny random Llama below, with bf16
compute, the logits' RMS difference from the bf16 model is 0.45 (NF4) and 0.036 (int8) of the logits'
standard deviation; the tests allow 0.6 and 0.06. On the real Gemma-3-270M it is 0.27 and 0.038.
"""

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import torch
from test_model import padded_batch

from jax_implicit import convert, lora, quant
from jax_implicit import model as M


def test_nf4_with_double_quantisation_matches_bitsandbytes():
    np.testing.assert_array_equal(quant.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(quant.dynamic_code(), bnb.create_dynamic_map().numpy())
    torch.manual_seed(0)
    w = torch.randn(192, 640) * 0.05  # 1920 blocks of 64: 8 second-level blocks, the last one partial
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quant.quantize(jnp.asarray(w.numpy()), "nf4")
    np.testing.assert_array_equal(np.asarray(ours["nf4"]).reshape(-1), packed.numpy().reshape(-1))
    # the float32 scales, from bitsandbytes' own double quantisation: the same weight back, bit for bit
    theirs_scales = dict(absmax=state.absmax.numpy().reshape(ours["absmax"].shape), absmax2=state.state2.absmax.numpy(),
                         offset=np.float32(state.offset))
    same_scales = quant.dequantize({**ours, **theirs_scales}, jnp.float32)
    np.testing.assert_array_equal(np.asarray(same_scales), bnb.dequantize_4bit(packed, state).numpy())
    # our second-level codes: the nearest of the dynamic map's levels; bitsandbytes' CPU search takes the
    # other neighbour of a near tie now and then, and its float32 mean may differ in the last bit
    assert abs(float(ours["offset"]) - float(state.offset)) <= 2e-8
    np.testing.assert_allclose(np.asarray(ours["absmax2"]), state.state2.absmax.numpy(), rtol=1e-6)
    ours_codes, theirs = np.asarray(ours["absmax"]).reshape(-1), state.absmax.numpy()
    assert (ours_codes != theirs).mean() < 0.02 and np.abs(ours_codes.astype(int) - theirs).max() <= 1
    blocks = w.abs().reshape(-1, 64).max(1).values.numpy()
    scaled = (blocks - float(ours["offset"])) / np.repeat(np.asarray(ours["absmax2"]), 256)[:len(blocks)]
    distance = np.abs(quant.dynamic_code()[None, :] - scaled[:, None])
    np.testing.assert_allclose(distance[np.arange(len(blocks)), ours_codes], distance.min(1), atol=1e-7)


def test_int8_round_trip_is_within_half_a_step_per_block():
    w = jax.random.normal(jax.random.PRNGKey(0), (32, 128)) * 0.1
    q = quant.quantize(w, "int8")
    back = quant.dequantize(q, jnp.float32)
    step = np.repeat(np.asarray(q["scale"]), 64, axis=1)
    assert np.all(np.abs(np.asarray(back - w)) <= step / 2 + 1e-7)
    assert q["int8"].dtype == jnp.int8 and quant.stored_bits("int8") == 8.5


def _logits(decoder, ids, mask):
    return np.asarray(jax.jit(lambda d, i, m: d(i, M.positions_from_mask(m), m)[0])(decoder, ids, mask))


def test_qlora_forward_dequantises_on_the_fly_within_tolerance(tiny_hf):
    hf_dir = tiny_hf("llama_gqa_tied")
    ids, mask = padded_batch(256)

    def build(kind, dtype):
        decoder = convert.load_hf(hf_dir, dtype=dtype)
        lora.apply(decoder, lora.lora_config(4, 8.0, quant=kind))
        decoder.layers.wq_lora_b[...] = jax.random.normal(jax.random.PRNGKey(0), decoder.layers.wq_lora_b.shape) * 0.3
        return decoder

    bf16 = _logits(build("none", "bfloat16"), ids, mask)[mask]
    for kind, tolerance in (("nf4", 0.6), ("int8", 0.06)):
        decoder = build(kind, "bfloat16")
        assert not hasattr(decoder.layers, "wq") and getattr(decoder.layers, f"wq_q_{kind}").dtype == {
            "nf4": jnp.uint8, "int8": jnp.int8}[kind]
        assert np.sqrt(np.mean((_logits(decoder, ids, mask)[mask] - bf16) ** 2)) <= tolerance * bf16.std()
        # in float32 the quantised forward is exactly the forward of its dequantised (merged) weights
        exact = build(kind, "float32")
        np.testing.assert_allclose(_logits(exact, ids, mask)[mask], _logits(lora.merged(exact), ids, mask)[mask],
                                   atol=1e-4)
