"""Config sections shared by every command (ml_collections; files in configs/ compose them).

Configs hold values only; the code that reads them validates them before anything compiles.
"""

from __future__ import annotations

from ml_collections import ConfigDict

SMOLLM2 = "checkpoints/smollm2-135m-instruct"


def model(path: str = SMOLLM2, param_dtype: str = "float32", dtype: str = "float32", remat: str = "none",
          loss_chunk: int = 0) -> ConfigDict:
    """An HF model folder (or hub id when online), the dtypes to run it in, and the memory controls
    (`memory.py`: remat policy of the layer scan, tokens per loss chunk, opt-in to bfloat16 master weights)."""
    return ConfigDict(dict(path=path, tokenizer="", param_dtype=param_dtype, dtype=dtype, remat=remat,
                           loss_chunk=loss_chunk, bf16_master_weights=False))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, rules: str = "fsdp") -> ConfigDict:
    """Device mesh sizes (one may be -1: filled from the device count) and the logical-axis rule table."""
    return ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))
