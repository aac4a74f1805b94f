"""One optimizer step against transformers (and peft for LoRA/QLoRA): `python -m benchmarks.train`."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        steps=3,  # timed optimizer steps per side, interleaved (medians and fastest steps are reported)
        batch=4,  # rows of random tokens
        seq=256,  # tokens per row
        variants=("full",),  # any of full, lora, qlora
    ))
