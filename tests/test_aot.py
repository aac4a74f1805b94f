"""Ahead-of-time compilation for a TPU slice on this CPU machine (libtpu, no TPU): the real training
micro-step and decoding program, their per-device sizes, and the compiler's refusal of what does not fit."""

import pytest
from ml_collections import ConfigDict

from jax_implicit import aot
from jax_implicit import model as M

TINY = M.ModelConfig("llama", 256, 64, 128, 2, 4, 2, 16, dtype="bfloat16", eos_token_ids=(2,))
FSDP = dict(data=1, fsdp=-1, tensor=1, rules="fsdp")
HBM = aot.TARGETS["tpu-v5e-8"].device_bytes


@pytest.fixture(scope="module")
def sh():
    return aot.sharder(FSDP, aot.devices("tpu-v5e-8"))


def test_train_step_sizes_grow_with_batch_and_sequence(sh):
    """1 -> 4 rows per device, and 256 -> 1024 tokens (XLA's TPU buffers hardly change below that)."""
    base, wide, long = (aot.train_step(TINY, sh, b, t, HBM) for b, t in ((8, 256), (32, 256), (8, 1024)))
    assert all(c.fits and not c.refused for c in (base, wide, long))
    assert wide.arguments > base.arguments  # parameters + accumulator, then tokens, mask and weights
    assert wide.temporaries > 2 * base.temporaries and long.temporaries > 2 * base.temporaries
    assert wide.flops > 3 * base.flops and long.flops > 3 * base.flops
    matrices = 256 * 64 * 2 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # embed, head; q, o; k, v; MLP
    norms = 2 * 2 * 64 + 64
    assert base.resident == 2 * 4 * (matrices // 8 + norms) + 4  # Adam's moments: matrices split 8 ways, the count


def test_decode_program_sizes_grow_with_batch_and_cache(sh):
    base, wide, long = (aot.decode_program(TINY, sh, b, s, 16, HBM) for b, s in ((8, 128), (16, 128), (8, 256)))
    cache_bytes = lambda rows, slots: 2 * 2 * rows * slots * 2 * 16 * 2 // 8  # k and v, bf16, rows split over 8
    assert wide.arguments - base.arguments >= cache_bytes(8, 128)
    assert long.arguments - base.arguments >= cache_bytes(8, 128)
    assert base.fits and base.peak < wide.peak and base.peak < long.peak


def test_decode_estimate_covers_the_growing_cache(sh):
    """1040 slots grow through five segments (128 ... 1024, 1040): the caches held beside the full one while
    one grows into the next are in the planner's estimate, which covers the compiler's peak."""
    compiled = aot.decode_program(TINY, sh, 64, 1040, 16, HBM)
    assert compiled.fits and compiled.peak <= aot.decode_estimate(TINY, sh, 64, 1040, 16)


def test_a_program_that_does_not_fit_is_refused_and_chunked_loss_makes_it_fit(sh, capsys):
    """Gemma-sized vocabulary: 4 rows x 4096 tokens x 262144 float32 logits per device are 16 GiB.
    The command (`plan --config.compile_for=...`) reports the refusal, a fix, and exits non-zero."""
    vocab = TINY.replace(vocab_size=262144, num_layers=1)
    cfg = ConfigDict(dict(compile_for="tpu-v5e-8", model=dict(path="tiny"), mesh=FSDP,
                          data=dict(max_seq_length=4096), train=dict(micro_batch=32),
                          decode=dict(batch=8, slots=256, prompt=16, param_dtype="bfloat16", dtype="bfloat16")))
    assert aot.main(cfg, vocab) == 1
    out = capsys.readouterr().out
    assert "refused by the compiler (RESOURCE_EXHAUSTED)" in out and "does NOT fit" in out
    assert "to fit: model.remat='none' model.loss_chunk=512 (planner)" in out
    chunked = aot.train_step(vocab.replace(loss_chunk=512), sh, 32, 4096, HBM)
    assert chunked.fits and chunked.peak < HBM / 2
