"""`make safety-demo`: refusal rates of Gemma-3-270M base, base x rules, response-tuned, and response-tuned with
Response Tuning's contextual refusals mixed in, on small seeded slices of the four refusal benchmarks.

    python -m jax_implicit.safety_demo --config=configs/safety_demo.py
    python -m jax_implicit.safety_demo --config.limit=20 --config.refusals.n=64   # larger, slower

Sized to finish in 15 minutes on 2 CPU cores; the paper's settings are configs/eval/safety.py (every item,
2048 new tokens, Llama-3.1-70B judge) and 100-200 refusals mixed into all 1,030 LIMA examples.
"""

from ml_collections import ConfigDict

from jax_implicit import config, refusals


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = config.model(path="checkpoints/gemma-3-270m")
    c.data = ConfigDict(dict(lima="lima"))  # response-tuning data: a dataset name (data/README.md), file or hub id
    c.limit = 6  # items per benchmark (per HarmBench subset): 6 x 5 = 30 prompts per model
    c.max_new_tokens = 48
    c.prefixes = "experiments/evaluate_individual.py"
    # the same short response-tuning run as `make demo`, once plain and once with refusals appended
    # micro-batches of 4 (make demo: 8): the 262k-vocabulary logits are halved; peak RSS 8.7 GB instead of 10.4 GB
    c.tune = ConfigDict(dict(examples=64, max_seq_length=96, epochs=1, global_batch=16, micro_batch=4, lr=5e-5))
    c.refusals = refusals.refusal_config("contextual", n=16, seed=0)  # 64 LIMA + 16 refusals: 5 steps
    c.judge = ConfigDict(dict(kind="none"))  # the prefix classifier only: a local LLM judge would not fit 15 minutes
    c.work = "checkpoints/safety_demo"
    c.report = "reports/safety_demo"
    return c
