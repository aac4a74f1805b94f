"""The end-to-end evaluation workload against transformers: `python -m benchmarks.generate`."""

from ml_collections import ConfigDict

from jax_implicit import config, rules


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = config.model()
    c.rules = rules.default_config()
    c.tag_set = "user_assistant"  # the prompt format: user_assistant, or AB for the tag ablation
    c.limit = 0  # take at most this many instructions from each dataset (0: 56 val + 200 AlpacaEval)
    c.new_tokens = 512  # response tokens at most (stopping at EOS)
    c.batch_size = 16  # our decoding slots (continuous batching)
    c.bucket = 64  # our prompts are grouped by padded width from this up (batching.prompt_width)
    c.hf_batch_sizes = (8, 16)  # transformers batch sizes to try (the best counts)
    c.hf_threads = ("default", "1")  # torch thread settings tried with each batch size (the fastest counts)
    return c
