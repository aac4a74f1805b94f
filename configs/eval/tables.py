"""The paper's tables from a results folder: `python -m jax_implicit.evaluate.tables --config=configs/eval/tables.py[:E]`.

Rows map a label to a method folder and columns a label to a base-model folder (see
jax_implicit/evaluate/layout.py). The row sets follow the paper's Tables 1-4; edit them freely.
Tuned models' folders carry their epochs (`response_10ep`, as jax_implicit.sweep writes them): the
argument E (default 10) picks which; the base model and the rules were not trained.
"""

from ml_collections import ConfigDict

from jax_implicit.evaluate.layout import method


def get_config(epochs: str = "10") -> ConfigDict:
    if not epochs.isdigit():
        raise ValueError(f"configs/eval/tables.py:{epochs}: the argument is the tuned models' epochs, e.g. 10")
    e = int(epochs)
    cfg = ConfigDict()
    cfg.results = "results"
    cfg.eval_set = "alpaca_eval"  # or "val"
    cfg.judge = "weighted_alpaca_eval_gpt4_turbo"  # judge folder; a local one is "local-<judge model folder>"
    cfg.seeds = 5  # seeds per cell in the paper; cells with fewer say so
    cfg.columns = (("Llama-2-7B", "llama2-7b"), ("OLMo-7B", "olmo-7b"))
    cfg.tables = ConfigDict(dict(
        table1=dict(title="Table 1: response tuning vs instruction tuning",
                    kind="head_to_head", rows=(("Base model", "base"), ("Response tuning", method("response", e)))),
        table2=dict(title="Table 2: response ranking capability (%)", kind="ranking",
                    rows=(("Base model", "base"), ("Instruction tuning", method("instruction", e)),
                          ("Response tuning", method("response", e)))),
        table3=dict(title="Table 3: single-task finetuning",
                    kind="head_to_head",
                    rows=tuple((label, method(task, e)) for label, task in (
                        ("GSM", "gsm8k"), ("MBPP", "mbpp"), ("Poetry", "poetry"), ("Recipes", "recipes"),
                        ("Chess", "chess")))),
        table4=dict(title="Table 4: rule-based adapter and one-rule ablations",
                    kind="head_to_head",
                    rows=(("Base model", "base"), ("Base + rules", "rules"), ("- EOS rule", "rules_no_eos"),
                          ("- uniform token changes", "rules_no_uniform"), ("- diversity rule", "rules_no_diversity"))),
    ))
    cfg.file = "tables.md"  # written into the results folder
    cfg.out = ""  # another markdown file to write instead
    return cfg
