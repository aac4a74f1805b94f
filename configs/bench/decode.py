"""Decoding throughput against transformers: `python -m benchmarks.decode` (benchmarks/decode.py)."""

from ml_collections import ConfigDict

from jax_implicit import config, rules


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = config.model()
    c.rules = rules.default_config()
    c.tag_set = "user_assistant"  # the prompt format: user_assistant, or AB for the tag ablation
    c.prompts = "val"  # instructions file (JSON/JSONL) or dataset name; the first rows fill each batch
    c.batch_sizes = (1, 16)  # batch sizes to time
    c.new_tokens = 128  # tokens generated per row (EOS does not stop either side)
    c.reps = 3  # timed repetitions per side (the best counts)
    c.hf_threads = ("default", "1")  # torch thread settings tried for transformers (the faster is the baseline)
    return c
