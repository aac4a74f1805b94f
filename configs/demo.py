"""`make demo`: the paper's pipeline end to end on a real model, sized for a 2-core CPU.

    python -m jax_implicit.demo --config=configs/demo.py                # Gemma-3-270M base
    python -m jax_implicit.demo --config=configs/demo.py:smollm2        # SmolLM2-135M-Instruct
    python -m jax_implicit.demo --config.data.lima=my_lima.jsonl        # your own files (or hub ids)

The paper's claims are about base models, so the default is Gemma-3-270M *base*, on which the
rules and response tuning visibly change the answers; SmolLM2-135M-Instruct is already
instruction-tuned. Sizes are chosen so the whole job takes minutes on 2 CPU cores (Gemma's 262k
vocabulary makes every token about twice SmolLM2's cost, so the tuning run is short); the paper's
settings are in configs/train/paper.py and configs/generate.py.
"""

from ml_collections import ConfigDict

from jax_implicit import config

MODELS = {"smollm2": config.SMOLLM2, "gemma": "checkpoints/gemma-3-270m"}


def get_config(model: str = "gemma") -> ConfigDict:
    if model not in MODELS:
        raise ValueError(f"unknown demo model {model!r}; expected one of {sorted(MODELS)}")
    c = ConfigDict()
    c.model = config.model(path=MODELS[model])
    # The judge must follow instructions itself, so it stays the instruction-tuned SmolLM2 whatever is tested.
    c.judge_model = config.model(path=config.SMOLLM2)
    # Data: dataset names (data/README.md), files or hub ids. Offline, response ranking reads Dolly rows as the
    # stand-in for Alpaca (`--config.data.ranking=tatsu-lab/alpaca` online).
    c.data = ConfigDict(dict(
        val="val",  # instructions answered and judged
        lima="lima",  # response-tuning data (user turns emptied by the tuning mode)
        ranking="dolly",  # {instruction, input, output} rows for response ranking
    ))
    c.instructions = 56  # the paper's validation set has 56
    c.max_new_tokens = 64  # per answer
    c.side_by_side = 4  # instructions shown in full in the report
    c.tune = ConfigDict(dict(
        examples=64,  # LIMA rows tuned on
        max_seq_length=96,  # tokens per example after truncation
        epochs=1,
        global_batch=16,  # examples per optimizer step
        micro_batch=8,  # examples per forward pass (gradients accumulate)
        lr=5e-5,  # Adam learning rate, cosine schedule with 10% warmup
    ))
    c.ranking = ConfigDict(dict(
        examples=6,  # rows ranked
        k=5,  # random other responses per row
        seed=0,  # draw of those responses
        max_seq_length=256,  # prompt + response tokens at most
    ))
    c.judged = 8  # instructions per head-to-head (both output orders each)
    c.work = "checkpoints/demo"  # model outputs, the tuning run and its HF export
    c.report = "reports/demo"  # summary.md, side_by_side.md, results.json, PNG plots
    return c
