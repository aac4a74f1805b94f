"""Response Tuning's refusal table from a results folder, through the tables command:

    python -m jax_implicit.evaluate.tables --config=configs/eval/safety_tables.py:10 --config.results=results

One table per base model: rows of methods (as jax_implicit.sweep with `safety=True` writes them), a column
per headline rate of jax_implicit/evaluate/safety.py, mean ± std over seeds. The argument E (default 10)
picks the tuned models' epochs.
"""

from ml_collections import ConfigDict

from jax_implicit.evaluate.layout import method

COLUMNS = ("AdvBench", "HarmBench avg", "MaliciousInstruct", "XSTest unsafe refused", "XSTest safe complied",
           "XSTest F1", "XSTest acc")


def get_config(epochs: str = "10") -> ConfigDict:
    if not epochs.isdigit():
        raise ValueError(f"configs/eval/safety_tables.py:{epochs}: the argument is the tuned models' epochs, e.g. 10")
    e = int(epochs)
    cfg = ConfigDict()
    cfg.results = "results"
    cfg.eval_set = "alpaca_eval"  # unused by refusal tables; the tables command reads it for head-to-head ones
    cfg.judge = ""
    cfg.seeds = 5
    cfg.columns = ()
    rows = (("Base model", "base"), ("Base + rules", "rules"), ("Instruction tuning", method("instruction", e)),
            ("Response tuning", method("response", e)))
    cfg.tables = ConfigDict({
        f"safety_{base.replace('-', '_')}": dict(
            title=f"Refusal evaluation, {label} (judge classifier, %)", kind="safety", base=base, classifier="judge",
            columns=COLUMNS, rows=rows)
        for label, base in (("Llama-2-7B", "llama2-7b"), ("OLMo-7B", "olmo-7b"))})
    cfg.file = "safety_tables.md"  # written into the results folder
    cfg.out = ""  # another markdown file to write instead
    return cfg
