"""Memory planner: Llama-2-7B figures against a hand calculation; the activation formula against jax.vjp."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_implicit import model as M
from jax_implicit import plan as P

GiB = 2**30
LLAMA = P.model_config("meta-llama/Llama-2-7b-hf", "float32", "bfloat16")
FSDP = dict(data=1, fsdp=-1, tensor=1, rules="fsdp")


def test_llama2_7b_by_hand():
    # Llama-2-7B: embed and lm_head 32000 x 4096 each; per layer q,k,v,o 4 x 4096^2 and MLP 3 x 4096 x 11008
    # plus two 4096 norm scales; a final 4096 norm.
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # 202,383,360
    total = 2 * 32000 * 4096 + 32 * layer + 4096
    assert total == 6_738_415_616
    norms = 32 * 2 * 4096 + 4096  # replicated under the fsdp rules (only `embed` is split)

    # TPU v4-8: 4 devices of 32 GiB; fsdp=4; micro-batch 8 -> 2 rows of 2048 tokens per device
    elems = (total - norms) // 4 + norms
    per_token_layer = (2 * (4 * 4096 + 8 + 2 * 2 * 4096)  # two RMS norms: f32 input, 2 stats, bf16 normed + scaled
                       + 4 * 128 * 2  # cos/sin tables
                       + (32 + 32 + 32 + 32) * 128 * 2  # q, k, v, attention output (bf16)
                       + 32 * (2048 * (1 + 4 + 2) + 8)  # mask, f32 scores, bf16 probs, 2 f32 softmax stats, per head
                       + 6 * 11008 * 2)  # MLP
    assert per_token_layer == 690_448
    final_per_token = 4 * 32 * 2048 + (4 * 4096 + 8 + 2 * 2 * 4096) + 2 * 32000 * 4  # mask, final norm, logits + grad
    want = {
        "parameters": elems * 4,
        "gradients": elems * (4 + 4),  # float32 accumulator + one micro-batch gradient
        "optimizer (Adam)": elems * 2 * 4,
        "activations": 2 * 2048 * (32 * per_token_layer + final_per_token),
        "weight copies": elems * 2,  # bf16 casts kept for the backward pass
        "workspace": layer * (2 + 4),  # one gathered layer in bf16 and its float32 gradient
    }
    got = P.plan(LLAMA, FSDP, "tpu-v4-8", micro_batch=8, seq=2048)
    assert got.params == total
    assert got.mesh == dict(data=1, fsdp=4, tensor=1) and got.rows_per_device == 2
    assert got.bytes == want
    assert got.total == 131_034_947_584  # 122.0 GiB: far beyond 0.9 x 32 GiB
    assert got.usable == int(0.9 * 32 * GiB) and not got.fits

    # 8 x 80 GB GPUs: fsdp=8, one row per device: fits at micro-batch 8, not at 16
    elems8 = (total - norms) // 8 + norms
    total8 = elems8 * (4 + 8 + 8 + 2) + 2048 * (32 * per_token_layer + final_per_token) + layer * 6
    got8 = P.plan(LLAMA, FSDP, "gpu-8x80gb", micro_batch=8, seq=2048)
    assert got8.total == total8 == 66_127_552_512 and got8.fits
    assert P.largest_micro_batch(LLAMA, FSDP, "gpu-8x80gb", seq=2048) == 8
    assert P.largest_micro_batch(LLAMA, FSDP, "tpu-v5e-8", seq=2048) == 0


def test_tensor_split_divides_heads_and_mlp():
    tp = dict(data=1, fsdp=2, tensor=2, rules="fsdp_tp")
    a, b = P.plan(LLAMA, tp, "tpu-v4-8", 2, 2048), P.plan(LLAMA, FSDP, "tpu-v4-8", 4, 2048)
    assert a.rows_per_device == b.rows_per_device == 1
    assert a.bytes["parameters"] == b.bytes["parameters"]  # matrices in 4 shards either way, norms replicated
    assert a.bytes["activations"] < 0.6 * b.bytes["activations"]  # attention and MLP activations halved
    layer, norms = 4 * 4096 * 4096 + 3 * 4096 * 11008, 2 * 4096
    assert a.bytes["workspace"] == (layer // 2 + norms) * 6  # the gathered layer is still split over tensor
    assert b.bytes["workspace"] == (layer + norms) * 6


@pytest.mark.parametrize("kind,dtype,remat", [("llama", "bfloat16", "none"), ("olmo", "bfloat16", "none"),
                                              ("llama", "float32", "none"), ("llama", "bfloat16", "full"),
                                              ("olmo", "bfloat16", "dots")])
def test_activation_formula_equals_jax_vjp_residuals(kind, dtype, remat):
    """Per layer and token, the planner's bytes are exactly what jax.vjp keeps for this model's loss."""
    cfg = M.ModelConfig(kind, 1000, 64, 176, 3, 4, 2, 16, dtype=dtype, norm="layernorm" if kind == "olmo" else "rms",
                        remat=remat)
    B, T = 2, 24
    graphdef, params = nnx.split(M.abstract(cfg))

    def loss(params, ids, mask):
        logits = nnx.merge(graphdef, params)(ids, M.positions_from_mask(mask), mask)[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1).sum()

    args = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), bool)
    residuals = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], params, *args))
    nbytes = lambda x: int(np.prod(x.shape)) * x.dtype.itemsize
    per_layer = sum(nbytes(r) for r in residuals if r.shape[:2] == (3, B))
    one = dict(heads=1, kv_heads=1, mlp=1)
    assert per_layer == 3 * B * T * P.kept_bytes_per_token(cfg, T, one)
    if dtype != cfg.param_dtype and remat == "none":  # the bf16 weight casts kept per layer = the layer weights at 2 bytes
        casts = sum(nbytes(r) for r in residuals if r.shape[0] == 3 and r.shape[1] != B)
        layer_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.to_pure_dict(params["layers"])))
        assert casts == layer_params * 2


def test_plan_command_prints_every_accelerator():
    out = subprocess.run([sys.executable, "-m", "jax_implicit.plan", "--config=configs/plan.py:olmo_7b"],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("allenai/OLMo-7B-hf (6.89 B parameters") == len(P.HARDWARE)
    for hw in P.HARDWARE:
        assert f"on {hw} (" in out
    assert out.count("does NOT fit") == 4 and out.count(": fits;") == 2  # only the 8 x 80 GB GPU hosts
    assert out.count("  to fit: ") == 4 and out.count("  roofline: ") == len(P.HARDWARE)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="hardware='tpu-v9'"):
        P.plan(LLAMA, FSDP, "tpu-v9", 8, 2048)
    with pytest.raises(ValueError, match="mesh.rules='zero3'"):
        P.plan(LLAMA, dict(FSDP, rules="zero3"), "tpu-v4-8", 8, 2048)
    with pytest.raises(ValueError, match="needs 3 devices"):
        P.plan(LLAMA, dict(data=3, fsdp=1, tensor=1), "tpu-v4-8", 8, 2048)
    with pytest.raises(FileNotFoundError, match="model.path='nowhere'"):
        P.model_config("nowhere", "float32", "float32")


def test_remat_and_chunked_loss_shrink_activations_and_the_planner_suggests_them():
    base = P.plan(LLAMA, FSDP, "tpu-v5p-8", 8, 2048)
    full = P.plan(LLAMA.replace(remat="full", loss_chunk=512), FSDP, "tpu-v5p-8", 8, 2048)
    assert not base.fits and full.fits
    assert full.bytes["activations"] < 0.1 * base.bytes["activations"] and full.bytes["weight copies"] == 0
    # 2 rows per device: 32 layers keep their bf16 input (2 x 4096 bytes per token), one layer is recomputed,
    # and 512 tokens of float32 logits and their gradient exist at a time
    split = dict(heads=1, kv_heads=1, mlp=1)
    final = 4 * 32 * 2048 + P.norm_bytes_per_token(LLAMA)
    assert full.bytes["activations"] == 2 * (2048 * (32 * 2 * 4096 + P.layer_bytes_per_token(LLAMA, 2048, split) + final)
                                             + 512 * 8 * 32000)
    assert P.suggest(LLAMA, FSDP, "tpu-v5p-8", 8, 2048) == "model.remat='dots' model.loss_chunk=0"
    assert P.suggest(LLAMA, FSDP, "tpu-v5e-16", 16, 2048) == "model.remat='full' model.loss_chunk=0"
    assert P.suggest(LLAMA, FSDP, "tpu-v5e-8", 8, 2048).startswith("a larger accelerator: tpu-v5e-16")
