"""Response ranking (Table 2): the jitted, length-packed metric equals a hand computation with transformers,
whatever the batching."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from configs.eval import ranking as ranking_config
from jax_implicit import convert
from jax_implicit.evaluate import ranking, scoring

N, K = 6, 5


@pytest.fixture(scope="module")
def dolly(data_dir):
    """Six real examples whose prompts fit the tiny model's context (rows 0, 5 have long responses)."""
    rows = ranking.load_examples(str(data_dir / "dolly" / "dolly_train.json"), 20)
    return [r for r in rows if len(r["instruction"]) + len(r["input"]) < 300][:N]


def torch_score(hf, tok, instruction: str, response: str) -> float:
    """exp(mean log p(response tokens, EOS | prompt)), written out from the paper's definition,
    cut at the tiny model's 256-token context (one dolly response is longer)."""
    prompt = f"<|user|>\n{instruction}\n<|assistant|>\n"
    ids = tok(prompt + response.strip() + tok.eos_token, return_tensors="pt").input_ids[:, :256]
    n_prompt = tok(prompt, return_tensors="pt").input_ids.shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, n_prompt - 1:-1].double(), -1)  # predicting tokens n_prompt..
    return float(torch.exp(logp[torch.arange(len(logp)), ids[0, n_prompt:]].mean()))


def test_ranking_equals_hand_computation(tiny_smol_dir, dolly):
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    out = ranking.rank(convert.load_hf(tiny_smol_dir), tok, dolly, k=K, seed=3, batch_tokens=1024)
    others = np.array(out["others"])
    assert others.shape == (N, K) and not np.any(others == np.arange(N)[:, None])
    hf = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32)
    user = [ex["instruction"] + (f"\n\n{ex['input'].strip()}" if ex["input"].strip() else "") for ex in dolly]
    real = np.array([torch_score(hf, tok, user[i], dolly[i]["output"]) for i in range(N)])
    rand = np.array([[torch_score(hf, tok, user[i], dolly[j]["output"]) for j in others[i]] for i in range(N)])
    np.testing.assert_allclose(out["real"], real, rtol=2e-4)
    np.testing.assert_allclose(out["random"], rand, rtol=2e-4)
    assert out["fraction"] == np.mean(real[:, None] - rand > 0)
    assert out["truncated"] > 0
    assert 0 < out["fraction"] < 1  # a random tiny model: both outcomes occur, so the comparison is exercised


def test_scores_do_not_depend_on_the_batching(tiny_smol_dir, dolly):
    """The sequences of the test above, packed for 1024 tokens (its compilations) and one sequence at a time."""
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    decoder = convert.load_hf(tiny_smol_dir)
    pairs = [(i, int(j)) for i in range(N) for j in [i, *ranking.pairings(N, K, seed=3)[i]]]
    encoded = [ranking.encode(tok, ranking.user_text(dolly[i]), dolly[j]["output"], "user_assistant") for i, j in pairs]
    seqs, starts = [ids[:256] for ids, _ in encoded], [s for _, s in encoded]
    packed = [scoring.continuation_logprobs(decoder, seqs, starts, batch_tokens=budget) for budget in (1024, 1)]
    assert len(scoring.batches(decoder, seqs, 1024)) < len(seqs) == len(scoring.batches(decoder, seqs, 1))
    np.testing.assert_array_equal(packed[0][1], packed[1][1])
    np.testing.assert_allclose(packed[0][0], packed[1][0], rtol=1e-6)


def test_pairings_are_seeded():
    a, b = ranking.pairings(50, 5, seed=1), ranking.pairings(50, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ranking.pairings(50, 5, seed=2))
    assert a.min() >= 0 and a.max() < 50 and not np.any(a == np.arange(50)[:, None])


def test_run_same_number_for_same_seed_and_on_a_mesh(tiny_smol_dir, data_dir, tmp_path):
    cfg = ranking_config.get_config()
    cfg.model.path = str(tiny_smol_dir)
    cfg.data = str(data_dir / "dolly" / "dolly_train.json")
    cfg.n, cfg.k, cfg.batch_tokens = 3, 2, 1024
    cfg.run.results, cfg.run.base, cfg.run.method, cfg.run.seed = str(tmp_path), "tiny", "base", 3
    first = ranking.run(cfg)
    written = json.loads((tmp_path / "tiny" / "base" / "seed3" / "ranking.json").read_text())
    assert written["fraction"] == first["fraction"] == ranking.run(cfg)["fraction"]
    assert written["seed"] == 3 and written["others"] == ranking.pairings(3, 2, seed=3).tolist()  # the folder's seed
    cfg.sharded, cfg.mesh.fsdp = True, 2  # 8 simulated devices: batch rows over data x fsdp, weights over fsdp
    sharded = ranking.run(cfg)
    np.testing.assert_allclose(sharded["real"] + sum(sharded["random"], []), first["real"] + sum(first["random"], []),
                               rtol=1e-5)


def test_bad_ranking_data(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match=r"bad.json, row 1: key 'output' is missing"):
        ranking.load_examples(str(bad), 10)
    bad.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ranking.load_examples(str(bad), 10)
