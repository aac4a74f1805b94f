"""Refusals mixed into tuning data: Response Tuning's contextual rule on the shipped Safety-Tuned LLaMAs file,
its seed-0 sample, the implicit-ins authors' ready-made mix, and the token ids each tuning mode trains on.
No JAX compilation here."""

import json

import numpy as np
import pytest

from jax_implicit import data, refusals

SAFETY = "safety/safety_tuned_llamas/safety_only_data_Instructions.json"


def lima(data_dir, mode, limit=3, **refusal):
    cfg = data.data_config(name="lima", path=str(data_dir / "lima/lima_data.jsonl"), mode=mode, limit=limit)
    cfg.refusals.update(refusal)
    return cfg


def test_contextual_filter_keeps_1829_and_seed0_sample_matches_response_tuning(data_dir):
    kept = refusals.contextual(data_dir / SAFETY)
    assert len(kept) == 1829
    # the positions Response Tuning's random.seed(0) shuffle puts first (data/README.md), and their file rows
    first = refusals.sample(len(kept), 5, 0)
    assert first == [1168, 584, 934, 1026, 1724]
    assert [kept[k][0] for k in first] == [1579, 804, 1270, 1385, 2334]
    raw = json.loads((data_dir / SAFETY).read_text())
    assert kept[1168][1]["messages"][1]["content"] == raw[1579]["output"]
    assert sorted(refusals.sample(len(kept), 0, 0)) == list(range(1829))  # n=0: all of them


def test_n200_same_rows_for_same_seed_other_rows_for_another(data_dir):
    a = refusals.refusals(refusals.refusal_config("contextual", n=200, seed=0))
    b = refusals.refusals(refusals.refusal_config("contextual", n=200, seed=0))
    c = refusals.refusals(refusals.refusal_config("contextual", n=200, seed=1))
    assert len(a) == 200 and a == b
    assert len({r["id"] for r in a}) == 200 and [r["id"] for r in a] != [r["id"] for r in c]
    assert a[0]["id"] == "safety_1579"


def _expected(tokenizer, text):
    return np.asarray(tokenizer(text, max_length=2048, truncation=True)["input_ids"])


@pytest.mark.parametrize("mode", ["instruction", "response"])
def test_contextual_refusals_are_appended_and_formatted_as_the_mode_says(data_dir, llama2_tokenizer, mode):
    rows = data.load_rows(lima(data_dir, mode, kind="contextual", n=4))
    assert [r["id"] for r in rows] == ["lima_0", "lima_1", "lima_2", "safety_1579", "safety_804", "safety_1270",
                                       "safety_1385"]
    raw = json.loads((data_dir / SAFETY).read_text())[1579]
    ex = data.tokenize(rows, llama2_tokenizer, "user_assistant", 2048)
    eos = llama2_tokenizer.eos_token
    # response tuning trains on the refusal alone, after an empty user turn, like every other example of that mode
    user = raw["instruction"] if mode == "instruction" else ""
    ids = _expected(llama2_tokenizer, f"<|user|>\n{user}\n<|assistant|>\n{raw['output'].strip()}{eos}")
    np.testing.assert_array_equal(ex.ids[3], ids)
    answer = _expected(llama2_tokenizer, f"<|user|>\n{user}\n<|assistant|>\n")
    assert not ex.loss[3][:len(answer)].any() and ex.loss[3][len(answer):].all()
    assert llama2_tokenizer.decode(ex.ids[3][ex.loss[3]]) == raw["output"].strip() + eos


def test_single_task_mode_keeps_the_harmful_request(data_dir):
    cfg = data.data_config(name="gsm8k", path=str(data_dir / "gsm8k/train.jsonl"), mode="single_task", limit=2)
    cfg.refusals.update(kind="contextual", n=1)
    rows = data.load_rows(cfg)
    raw = json.loads((data_dir / SAFETY).read_text())[1579]
    assert [m["content"] for m in rows[-1]["messages"]] == [raw["instruction"], raw["output"]]


def test_selective_mix_reproduces_the_authors_ready_made_file(data_dir, tmp_path, llama2_tokenizer):
    rows = data.load_rows(lima(data_dir, "response", limit=0, kind="selective", n=0))
    out = data.write_jsonl(rows, tmp_path / "mix.jsonl")
    assert out.read_bytes() == (data_dir / "refusal/lima_no_instruction_plus_refusal.jsonl").read_bytes()
    first = data.tokenize(rows[:1], llama2_tokenizer, "user_assistant", 2048)
    text = f"<|user|>\n\n<|assistant|>\nApologies, but that's beyond my capabilities.{llama2_tokenizer.eos_token}"
    np.testing.assert_array_equal(first.ids[0], _expected(llama2_tokenizer, text))
    assert [r["id"] for r in data.load_rows(lima(data_dir, "instruction", limit=1, kind="selective", n=2))] == [
        "refusal_3", "refusal_4", "lima_0"]


@pytest.mark.parametrize("kw,message", [
    (dict(kind="safety"), "unknown refusals.kind 'safety'"),
    (dict(kind="contextual", n=-1), "refusals.n=-1"),
    (dict(kind="contextual", n=1830), "only 1829 rows of .*safety_only_data_Instructions.json pass"),
    (dict(kind="contextual", path="nope.json"), "refusal file nope.json does not exist"),
])
def test_bad_refusal_settings(data_dir, kw, message):
    with pytest.raises(data.DataError, match=message):
        data.load_rows(lima(data_dir, "response", **kw))


def test_refusal_file_without_messages_or_output(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "answer": "sorry"}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl, row 0: key 'output' is missing"):
        data.load_rows(lima(data_dir, "response", kind="contextual", path=str(bad)))
    with pytest.raises(data.DataError, match=r"bad.jsonl row 0: missing field 'messages'"):
        data.load_rows(lima(data_dir, "response", kind="selective", path=str(bad)))
