"""The copy ops left in the compiled decoding program: `python -m benchmarks.hlo_copies`."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        model="checkpoints/smollm2-135m-instruct",  # an HF model folder (only its config is read)
        slots=640,  # KV cache slots
        batch=16,  # rows
        prompt=32,  # prompt width
    ))
