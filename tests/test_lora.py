"""LoRA against HF peft on tiny random Llama, OLMo and Gemma 3 models: a peft adapter loaded here gives
peft's logits, an adapter exported here loads in `PeftModel.from_pretrained` with the same logits, and
the merged HF export equals the unmerged forward. Plus the adapters' shapes, axes and sharding."""

import jax
import numpy as np
import pytest
import torch
from test_gemma import tiny_gemma  # noqa: F401 -- the tiny Gemma 3 fixture
from test_model import padded_batch, torch_logits
from transformers import AutoModelForCausalLM

from jax_implicit import convert, lora
from jax_implicit import model as M

RANK, ALPHA = 4, 8.0


def peft_logits(model, ids, mask):
    pos = np.asarray(M.positions_from_mask(mask))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.numpy()


def forward(decoder, ids, mask):
    return np.asarray(jax.jit(lambda d, i, m: d(i, M.positions_from_mask(m), m)[0])(decoder, ids, mask))


def random_peft_adapter(hf_dir, out, targets):
    """A peft LoRA adapter with random A and B (peft starts B at zero, which would hide B's layout)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dirs(tiny_hf, tiny_gemma):  # noqa: F811
    return {"llama": tiny_hf("llama_gqa_tied"), "olmo": tiny_hf("olmo_clip"), "gemma3": tiny_gemma}


@pytest.mark.parametrize("family,targets", [
    ("llama", tuple(lora.TARGETS)),
    ("olmo", ("q_proj", "v_proj", "down_proj")),
    ("gemma3", tuple(lora.TARGETS)),
])
def test_lora_matches_peft_both_ways_and_merged_export(family, targets, tiny_dirs, tmp_path):
    from peft import PeftModel

    hf_dir = tiny_dirs[family]
    ids, mask = padded_batch(256)
    reference = random_peft_adapter(hf_dir, tmp_path / "from_peft", targets)
    want = peft_logits(reference, ids, mask)
    base_logits = torch_logits(hf_dir, ids, mask)
    assert np.abs(want - base_logits)[mask].max() > 1e-2  # the adapter really changes the output

    decoder = lora.load_peft(convert.load_hf(hf_dir), tmp_path / "from_peft")
    assert sorted(lora.adapted(decoder)) == sorted(lora.TARGETS[t] for t in targets)
    got = forward(decoder, ids, mask)
    assert np.abs(got - want)[mask].max() <= 1e-4

    lcfg = lora.lora_config(RANK, ALPHA, 0.1, targets)
    lora.export_peft(decoder, lcfg, tmp_path / "ours", base_model=str(hf_dir))
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    assert np.abs(peft_logits(reloaded, ids, mask) - got)[mask].max() <= 1e-4

    merged = lora.merged(decoder)
    assert not lora.adapted(merged)
    assert np.abs(forward(merged, ids, mask) - got)[mask].max() <= 1e-4
    convert.export_hf(merged, tmp_path / "merged")
    assert np.abs(torch_logits(tmp_path / "merged", ids, mask) - got)[mask].max() <= 1e-4


def test_adapters_start_at_the_base_model_carry_their_base_axes_and_drop_out_by_key(tiny_dirs):
    decoder = convert.load_hf(tiny_dirs["llama"])
    ids, mask = padded_batch(256)
    before = forward(decoder, ids, mask)
    lora.apply(decoder, lora.lora_config(rank=8, alpha=16, dropout=0.1))
    np.testing.assert_array_equal(forward(decoder, ids, mask), before)  # B starts at zero
    axes = M.logical_axes(decoder)["layers"]
    assert axes["wq_lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["wq_lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert axes["wo_lora_a"] == ("layers", "heads", "head_dim", "lora_rank")
    assert axes["wo_lora_b"] == ("layers", "lora_rank", "embed")
    assert decoder.layers.w_down_lora_a.shape == (2, 128, 8) and decoder.cfg.lora_scale == 2.0
    # dropout (training only): a function of its key, off without one
    decoder.layers.wq_lora_b[...] = jax.numpy.full(decoder.layers.wq_lora_b.shape, 0.1)
    with_key = jax.jit(lambda d, i, m, k: d(i, M.positions_from_mask(m), m, dropout_key=k)[0])
    first, again, other = (np.asarray(with_key(decoder, ids, mask, jax.random.PRNGKey(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other)[mask].max() > 1e-3 and np.abs(first - forward(decoder, ids, mask))[mask].max() > 1e-3
    _, trainable, frozen = lora.split(decoder)
    assert set(trainable["layers"]) == {f"{n}_lora_{p}" for n in lora.TARGETS.values() for p in "ab"}
    assert not any("lora" in k for k in frozen["layers"]) and "embed" in frozen


def test_bad_lora_settings_are_named():
    for kw, key in [(dict(rank=-1), "lora.rank"), (dict(targets=("qproj",)), "lora.targets"),
                    (dict(rank=4, dropout=1.0), "lora.dropout"), (dict(rank=4, quant="nf5"), "lora.quant"),
                    (dict(quant="nf4"), "lora.quant")]:
        with pytest.raises(ValueError, match=key):
            lora.check(lora.lora_config(**kw))
    odd = M.ModelConfig("llama", 256, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=4,
                        head_dim=16)
    lora.check_model(odd, lora.lora_config(rank=4))  # unquantised: any size
    with pytest.raises(ValueError, match="mlp.down_proj has 96"):
        lora.check_model(odd, lora.lora_config(rank=4, quant="nf4"))
