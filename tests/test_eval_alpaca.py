"""AlpacaEval head-to-head through the real alpaca_eval package: the local judge against a hand computation
with transformers, the GPT-4 path with only the OpenAI call mocked, and bad input."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from configs.eval import alpaca as alpaca_config
from jax_implicit.evaluate import alpaca

# A judging prompt short enough for the tiny model's 256-token context (the default is the GPT-4 judge's own).
SHORT_TEMPLATE = ("<|im_start|>user\nInstruction: {instruction}\nAnswer m: {output_1}\nAnswer M: {output_2}\n"
                  "Which answer is better, m or M?<|im_end|>")
INSTRUCTIONS = ["Name a primary color.", "What is 2 + 2?", "Say hello in French."]


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture()
def pair_files(tmp_path):
    outs = [{"instruction": ins, "output": out, "generator": "model", "dataset": "val"}
            for ins, out in zip(INSTRUCTIONS, ["Blue.", "4", "Bonjour!"])]
    refs = [{"instruction": ins, "output": out, "generator": "reference", "dataset": "val"}
            for ins, out in zip(INSTRUCTIONS, ["Red is a primary color.", "2 + 2 = 4.", "Hello."])]
    return write(tmp_path / "outputs.json", outs), write(tmp_path / "references.json", refs[::-1])


def local_config(tmp_path, model_dir, outputs, references):
    cfg = alpaca_config.get_config()
    cfg.outputs, cfg.references, cfg.eval_set = outputs, references, "val"
    cfg.judge.kind, cfg.judge.model.path = "local", str(model_dir)
    (tmp_path / "judge.txt").write_text(SHORT_TEMPLATE)
    cfg.judge.prompt_template = str(tmp_path / "judge.txt")
    cfg.run.results, cfg.run.base, cfg.run.method = str(tmp_path / "results"), "tiny", "response"
    return cfg


def test_outputs_of_another_evaluation_set_are_refused(pair_files, tmp_path):
    cfg = local_config(tmp_path, tmp_path / "no-judge", *pair_files)
    cfg.eval_set = "alpaca_eval"
    with pytest.raises(ValueError, match=r"outputs.json, row 0: dataset 'val' is not the evaluation set "
                                         r"eval_set='alpaca_eval'; set --config.eval_set"):
        alpaca.run(cfg)
    assert not (tmp_path / "results").exists()


def torch_preference(hf, tok, instruction, out_1, out_2) -> float:
    """2 - P(output_1 better), P averaged over both presentation orders, from the next-token logits of m / M."""
    m, big_m = tok("m", add_special_tokens=False).input_ids[0], tok("M", add_special_tokens=False).input_ids[0]
    probs = []
    for first, second, output_1_is in ((out_1, out_2, m), (out_2, out_1, big_m)):
        user = f"Instruction: {instruction}\nAnswer m: {first}\nAnswer M: {second}\nWhich answer is better, m or M?"
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            logits = hf(tok(text, return_tensors="pt", add_special_tokens=False).input_ids).logits[0, -1].double()
        pair = torch.softmax(logits[[m, big_m]], -1)
        probs.append(float(pair[0] if output_1_is == m else pair[1]))
    return 2 - float(np.mean(probs))


def test_local_judge_head_to_head_equals_hand_computation(tiny_smol_dir, pair_files, tmp_path):
    cfg = local_config(tmp_path, tiny_smol_dir, *pair_files)
    result = alpaca.run(cfg)
    folder = tmp_path / "results" / "tiny" / "response" / "seed0" / "val" / f"local-{tiny_smol_dir.name}"
    assert json.loads((folder / "result.json").read_text()) == result
    assert (folder / "leaderboard.csv").is_file() and (folder / "judge" / "configs.yaml").is_file()
    annotations = json.loads((folder / "annotations.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    refs = {r["instruction"]: r["output"] for r in json.loads(open(pair_files[1]).read())}
    outs = {r["instruction"]: r["output"] for r in json.loads(open(pair_files[0]).read())}
    want = {ins: torch_preference(hf, tok, ins, refs[ins], outs[ins]) for ins in INSTRUCTIONS}
    got = {a["instruction"]: a["preference"] for a in annotations}
    assert set(got) == set(INSTRUCTIONS) and all(a["generator_2"] == "model" for a in annotations)
    np.testing.assert_allclose([got[i] for i in INSTRUCTIONS], [want[i] for i in INSTRUCTIONS], atol=1e-5)
    assert result["win_rate"] == pytest.approx(100 * np.mean([want[i] - 1 for i in INSTRUCTIONS]), abs=1e-3)
    assert result["judge"] == f"local judge ({tiny_smol_dir.name}), not comparable with GPT-4 numbers"
    assert result["length_controlled_winrate"] is None and "GPT-4 judge" in result["lc_missing_reason"]
    assert result["reference"] == "reference" and result["n"] == 3 and not result["comparable_with_gpt4"]


def fake_gpt4(prompts, **kwargs):
    """Stands in for the OpenAI call only: prefers whichever output contains GOOD, as logprobs of m / M."""
    completions = []
    for p in prompts:
        good, second = p.find("GOOD"), p.find('"model_identifier": "M"')
        lm, lbig = (-0.05, -3.0) if 0 <= good < second else (-3.0, -0.05) if good > second else (-1.0, -1.0)
        completions.append({"logprobs": {"content": [{"token": "m", "top_logprobs": [
            {"token": "m", "logprob": lm}, {"token": "M", "logprob": lbig}]}]}})
    n = len(prompts)
    return dict(completions=["m"] * n, completions_all=completions, price_per_example=[0.0] * n,
                time_per_example=[0.0] * n)


def test_gpt4_judge_path_offline(data_dir, tmp_path, monkeypatch):
    """All 805 AlpacaEval instructions through weighted_alpaca_eval_gpt4_turbo; LC needs the hub, so it is
    reported missing with its reason rather than failing."""
    import alpaca_eval.decoders.openai

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setattr(alpaca_eval.decoders.openai, "openai_completions", fake_gpt4)
    rows = json.loads((data_dir / "alpaca_eval" / "alpaca_eval.json").read_text())
    outs = [{"instruction": r["instruction"], "output": ("GOOD " if i < 300 else "") + "answer", "generator": "m1"}
            for i, r in enumerate(rows)]
    refs = [{"instruction": r["instruction"], "output": "reference", "generator": "it"} for r in rows]
    cfg = alpaca_config.get_config()
    cfg.outputs, cfg.references = write(tmp_path / "o.json", outs), write(tmp_path / "r.json", refs)
    cfg.out = str(tmp_path / "h2h")
    result = alpaca.run(cfg)  # judge.kind "auto" with a key set: GPT-4
    p = np.exp(-0.05) / (np.exp(-0.05) + np.exp(-3.0))
    assert result["win_rate"] == pytest.approx(100 * (300 * p + 505 * 0.5) / 805, abs=1e-6)
    assert result["judge_kind"] == "gpt4" and result["comparable_with_gpt4"] and result["n"] == 805
    assert result["length_controlled_winrate"] is None and "df_gamed.csv" in result["lc_missing_reason"]
    assert (tmp_path / "h2h.gpt4_annotations_cache.json").is_file()  # paid annotations outlive a failed run


def test_bad_input_clear_errors_and_no_results(tiny_smol_dir, pair_files, tmp_path, monkeypatch):
    outputs, references = pair_files
    cfg = local_config(tmp_path, tiny_smol_dir, outputs, references)
    results = tmp_path / "results"
    rows = json.loads(open(references).read())
    rows[1]["instruction"] = "Something else entirely."
    cfg.references = write(tmp_path / "other.json", rows)
    with pytest.raises(ValueError, match=r"different instructions: 1 of the 3 in .*outputs.json are not in "
                                         r".*other.json, first row 1: 'What is 2 \+ 2\?'"):
        alpaca.run(cfg)
    cfg.references = references
    (tmp_path / "empty.json").write_text("[]")
    cfg.outputs = str(tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"outputs file .*empty.json is empty"):
        alpaca.run(cfg)
    cfg.outputs = outputs
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    cfg.judge.kind = "gpt4"
    with pytest.raises(RuntimeError, match="needs an OpenAI API key: set OPENAI_API_KEY"):
        alpaca.run(cfg)
    assert not results.exists()
    cfg.judge.kind = "local"
    long = json.loads(open(outputs).read())
    long[2]["output"] = "word " * 400  # the judge's prompt no longer fits the tiny model's context
    cfg.outputs = write(tmp_path / "long.json", long)
    with pytest.raises(ValueError, match=r"prompt \d+ is \d+ tokens, longer than the model's context of 256"):
        alpaca.run(cfg)  # fails inside alpaca_eval's annotation: the half-made result folder is removed
    assert not [p for p in results.rglob("*") if p.is_file() or p.name.startswith(".")]  # only empty parent folders
    cfg.judge.model.path = str(tmp_path / "no_model")
    with pytest.raises(FileNotFoundError, match="no_model"):
        alpaca.run(cfg)
    assert not [p for p in results.rglob("*") if p.is_file()]
    assert alpaca.judge_kind("auto") == "local"


def test_judge_answers_must_be_single_tokens(tiny_smol_dir, tmp_path):
    from jax_implicit import convert
    from jax_implicit.evaluate import judge

    decoder, tok = convert.load_hf(tiny_smol_dir), AutoTokenizer.from_pretrained(tiny_smol_dir)
    with pytest.raises(ValueError, match=r"judge answer 'Output \(a\)' is not a single token"):
        judge.LocalJudge(decoder, tok, name="tiny", answers=("Output (a)", "Output (b)"))
    with pytest.raises(ValueError, match="two different strings"):
        judge.LocalJudge(decoder, tok, name="tiny", answers=("m", "m"))
    (tmp_path / "t.txt").write_text("{instruction} {output_1}")
    with pytest.raises(ValueError, match=r"must contain \{output_2\} exactly once"):
        judge.template_path(tmp_path / "t.txt")


@pytest.mark.slow
def test_end_to_end_on_outputs_decoded_by_this_project(smollm2_dir, data_dir, tmp_path):
    """Real SmolLM2-135M-Instruct answers three validation instructions (this project's greedy decoder), then
    alpaca_eval judges them against the paper's gpt-3.5-turbo references with the default local judge."""
    from jax_implicit import convert, serving

    refs = json.loads((data_dir / "val_eval" / "val-gpt3.5-2.json").read_text())
    refs = sorted(refs, key=lambda r: len(r["output"]))[:3]  # the shortest references keep the judge's prompts short
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = serving.generate_texts(convert.load_hf(smollm2_dir), tok, [r["instruction"] for r in refs],
                                  max_new_tokens=32)
    outs = [{"instruction": r["instruction"], "output": t, "generator": "smollm2-greedy", "dataset": "val"}
            for r, t in zip(refs, texts)]
    cfg = alpaca_config.get_config()
    cfg.outputs, cfg.references = write(tmp_path / "outputs.json", outs), write(tmp_path / "refs.json", refs)
    cfg.eval_set, cfg.judge.kind, cfg.judge.model.path = "val", "local", str(smollm2_dir)
    cfg.out = str(tmp_path / "h2h")
    result = alpaca.run(cfg)
    board = (tmp_path / "h2h" / "leaderboard.csv").read_text().splitlines()
    annotations = json.loads((tmp_path / "h2h" / "annotations.json").read_text())
    assert board[1].startswith("smollm2-greedy,") and float(board[1].split(",")[1]) == pytest.approx(result["win_rate"])
    assert sorted(a["output_2"] for a in annotations) == sorted(texts) and result["reference"] == "gpt-3.5-turbo"
    assert result["win_rate"] == pytest.approx(100 * np.mean([a["preference"] - 1 for a in annotations]))
    assert result["judge"] == "local judge (smollm2-135m-instruct), not comparable with GPT-4 numbers"
    assert json.loads((tmp_path / "h2h" / "result.json").read_text()) == result
