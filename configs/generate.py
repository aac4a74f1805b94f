"""Greedy decoding with the paper's rule-based adapter (SmolLM2-135M by default).

    python -m jax_implicit.generate --config=configs/generate.py --config.data.instructions=alpaca_eval
    python -m jax_implicit.generate --config=configs/generate.py:no_eos   # Table 4 ablations:
                                                                         # no_eos, no_uniform, no_diversity, no_rules
"""

from ml_collections import ConfigDict

from jax_implicit import config, rules

VARIANTS = ("", "no_eos", "no_uniform", "no_diversity", "no_rules")


def get_config(variant: str = "") -> ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c = ConfigDict()
    c.model = config.model()
    c.mesh = config.mesh(data=-1, fsdp=1, tensor=1, rules="fsdp")  # the training mesh section; 7B: fsdp=-1
    c.rules = rules.default_config()
    c.use_rules = variant != "no_rules"
    if variant.startswith("no_") and variant != "no_rules":
        c.rules[variant[3:]] = False
    c.data = ConfigDict(dict(
        instructions="val",  # a JSON/JSONL file with an "instruction" per row, or "val" / "alpaca_eval"
        limit=0,  # 0: all rows
    ))
    c.decode = ConfigDict(dict(
        max_new_tokens=512,  # response tokens at most (the paper: 512 for AlpacaEval)
        batch_size=16,  # instructions decoded together
        bucket=64,  # the shortest padded prompt width; longer prompts pad to 96, 128, 192, 256, ... (batching.prompt_width)
        temperature=0.0,  # 0: greedy (the paper's setting)
        top_p=1.0,  # nucleus sampling mass when temperature > 0
        seed=0,  # sampling seed (greedy decoding ignores it)
        tag_set="user_assistant",  # or "AB" for the tag ablation
    ))
    c.generator = ""  # name written to the output; default: <model folder>-<variant> (greedy, rules, rules-no_eos, ...)
    c.output = ""  # default: outputs/generate/<generator>-<dataset>.json
    return c
