"""Training data: the authors' files and formats reproduced exactly, every formatter on hand-written rows,
the Llama-2 token ids and loss mask of a real LIMA example, batching. No JAX compilation here."""

import json

import numpy as np
import pytest

from jax_implicit import batching, data

LIMA_482 = {"dataset": "lima", "id": "lima_482", "messages": [
    {"role": "user", "content": "Hello, nice to meet you!"},
    {"role": "assistant", "content": "Nice to meet you! I am an AI assistant, how can I help you today?"}]}


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(name, path, mode="instruction", **kw):
    return data.data_config(name=name, path=str(path), mode=mode, **kw)


def test_lima_response_mode_reproduces_authors_file(data_dir, tmp_path):
    rows = data.load_rows(cfg("lima", data_dir / "lima/lima_data.jsonl", "response"))
    out = data.write_jsonl(rows, tmp_path / "noins.jsonl")
    assert out.read_bytes() == (data_dir / "lima/lima_no_instruction.jsonl").read_bytes()


def test_response_mode_multi_turn_keeps_every_assistant_turn():
    row = {"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    out = data.apply_mode(row, "response")
    assert [m["content"] for m in out["messages"]] == ["", "b", "", "d"]
    assert row["messages"][0]["content"] == "a"  # the input row is left alone


def test_llama2_ids_and_loss_mask_for_a_lima_example(llama2_tokenizer, data_dir):
    ids, loss = data.encode(LIMA_482["messages"], llama2_tokenizer, "user_assistant", 2048)
    pieces = llama2_tokenizer.convert_ids_to_tokens(ids.tolist())
    prompt = ["<s>", "▁<", "|", "user", "|", ">", "<0x0A>", "Hello", ",", "▁nice", "▁to", "▁meet", "▁you", "!",
              "<0x0A>", "<", "|", "ass", "istant", "|", ">", "<0x0A>"]
    response = ["N", "ice", "▁to", "▁meet", "▁you", "!", "▁I", "▁am", "▁an", "▁A", "I", "▁assistant", ",", "▁how",
                "▁can", "▁I", "▁help", "▁you", "▁today", "?", "</s>"]
    assert pieces == prompt + response
    assert ids.tolist() == [1, 529, 29989, 1792, 29989, 29958, 13, 10994, 29892, 7575, 304, 5870, 366, 29991, 13,
                            29966, 29989, 465, 22137, 29989, 29958, 13, 29940, 625, 304, 5870, 366, 29991, 306, 626,
                            385, 319, 29902, 20255, 29892, 920, 508, 306, 1371, 366, 9826, 29973, 2]
    assert loss.tolist() == [False] * len(prompt) + [True] * len(response)  # prompt and tags masked, EOS trained
    # the same ids from the original SentencePiece model, independently of transformers
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizers/llama2/tokenizer.model"))
    text = "<|user|>\nHello, nice to meet you!\n<|assistant|>\n" + LIMA_482["messages"][1]["content"]
    assert ids.tolist() == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]


def test_truncation_and_dropped_examples(llama2_tokenizer):
    ids, loss = data.encode(LIMA_482["messages"], llama2_tokenizer, "user_assistant", 25)
    assert len(ids) == 25 and loss.tolist() == [False] * 22 + [True] * 3
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend"}]}
    ex = data.tokenize([LIMA_482, short], llama2_tokenizer, "user_assistant", 22)
    assert ex.dropped == 1 and len(ex.ids) == 1 and ex.loss[0].any()  # LIMA_482 keeps no response token
    with pytest.raises(data.DataError, match="none of its 2 examples"):
        data.tokenize([LIMA_482, LIMA_482], llama2_tokenizer, "user_assistant", 22)


def test_ab_tags_and_multi_turn_mask(llama2_tokenizer):
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    assert data.render(messages, "AB", "</s>").strip() == "<|A|>\nHi\n<|B|>\nYo</s>\n<|A|>\nBye\n<|B|>\nCiao</s>"
    ids, loss = data.encode(messages, llama2_tokenizer, "AB", 2048)
    trained = llama2_tokenizer.decode(ids[loss])
    # both responses are trained; as in the authors' code the newline after a non-final EOS is too
    assert trained.replace("\n", "") == "Yo</s>Ciao</s>"
    assert "<|A|>" in llama2_tokenizer.decode(ids[~loss]) and "<|B|>" in llama2_tokenizer.decode(ids[~loss])


FORMAT_CASES = {
    "alpaca": ([{"instruction": "Add", "input": "2+2", "output": "4"}, {"instruction": "Hi", "input": "", "output": "Hey"}],
               [("Add\n\n2+2", "4"), ("Hi", "Hey")]),
    "dolly": ([{"instruction": "Sum up", "context": "Text", "response": "Short", "category": "summarization"},
               {"instruction": "Q", "input": "", "output": "A"}],
              [("Sum up\n\nText", "Short"), ("Q", "A")]),
    "gsm8k": ([{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}], [("1+1?", "1+1=<<1+1=2>>2\n#### 2")]),
    "mbpp": ([{"task_id": 1, "text": "Write f", "code": "def f():\n    pass"}], [("Write f", "def f():\n    pass")]),
    "poetry": ([{"poem name": "Dawn", "content": "Light\nrises"}, {"poem name": None, "content": "untitled"}],
               [("Write a poem called Dawn", "Light\nrises")]),
    "recipes": ([{"Title": "Toast", "Cleaned_Ingredients": "['bread', 'butter']", "Instructions": "Toast it."}],
                [("Recipe for Toast", " - bread\n - butter\n\n\nToast it.")]),
    "chess": ([{"text": '[Event "Rated"]'}, {"text": '[WhiteElo "1500"]'}, {"text": '[BlackElo "1450"]'},
               {"text": "1. e4 e5 2. Nf3 1-0"}, {"text": '[WhiteElo "2000"]'}, {"text": '[BlackElo "1990"]'},
               {"text": "1. d4 d5 0-1"}],
              [('[WhiteElo "1500"]\n[BlackElo "1450"]\n', "1. e4 e5 2. Nf3 1-0"),
               ('[WhiteElo "2000"]\n[BlackElo "1990"]\n', "1. d4 d5 0-1")]),
    "lima": ([{"conversations": ["Q1", "A1", "Q2", "A2"], "source": "stackexchange"}], [("Q1", "A1", "Q2", "A2")]),
}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_formatter_on_hand_written_rows(tmp_path, name):
    raw, expected = FORMAT_CASES[name]
    mode = "single_task" if name in data.SINGLE_TASK else "instruction"
    rows = data.load_rows(cfg(name, write_rows(tmp_path, raw), mode))
    assert [tuple(m["content"] for m in r["messages"]) for r in rows] == expected
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2) for r in rows)


@pytest.mark.parametrize("name,row,field", [("gsm8k", {"question": "q"}, "answer"),
                                            ("mbpp", {"code": "x"}, "text"),
                                            ("recipes", {"Title": "t", "Instructions": "i"}, "Cleaned_Ingredients"),
                                            ("poetry", {"content": "c"}, "poem name")])
def test_missing_field_is_reported_with_its_row(tmp_path, name, row, field):
    good = FORMAT_CASES[name][0][0]
    path = write_rows(tmp_path, [good, good, row])
    with pytest.raises(data.DataError, match=rf"rows.jsonl row 2: missing field '{field}'"):
        data.load_rows(cfg(name, path, "single_task"))


def test_gsm8k_from_the_real_file_takes_the_first_1000_unchanged(data_dir):
    rows = data.load_rows(cfg("gsm8k", data_dir / "gsm8k/train.jsonl", "single_task"))
    raw = [json.loads(line) for line in (data_dir / "gsm8k/train.jsonl").read_text().splitlines()[:1000]]
    assert len(rows) == 1000 and rows[-1]["id"] == "gsm8k_999"
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == \
        [(x["question"], x["answer"]) for x in raw]


def test_dolly_json_list_file(data_dir):
    rows = data.load_rows(cfg("dolly", data_dir / "dolly/dolly_train.json", limit=5))
    raw = json.loads((data_dir / "dolly/dolly_train.json").read_text())[:5]
    assert [r["messages"][1]["content"] for r in rows] == [x["output"] for x in raw]


@pytest.mark.parametrize("kw,message", [
    (dict(name="lima_v2"), "unknown dataset 'lima_v2'"),
    (dict(mode="responses"), "unknown tuning mode"),
    (dict(mode="single_task"), "single_task"),
    (dict(tag_set="XY"), "unknown tag set"),
])
def test_bad_settings(data_dir, kw, message):
    settings = dict(name="lima", path=str(data_dir / "lima/lima_data.jsonl"), mode="instruction") | kw
    with pytest.raises(ValueError, match=message):
        data.load_rows(data.data_config(**settings))


def test_non_json_and_missing_files(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"messages": []}\nthis is not json\n')
    with pytest.raises(data.DataError, match=r"data.jsonl is not JSON Lines: line 2"):
        data.load_rows(cfg("lima", bad))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_rows(cfg("lima", tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data.DataError, match="has no rows"):
        data.load_rows(cfg("lima", empty))
    bad.write_text('{"messages": []}\n')
    with pytest.raises(data.DataError, match="row 0: 'messages' must be a non-empty list"):
        data.load_rows(cfg("lima", bad))


def test_buckets_order_and_micro_batches():
    assert batching.sizes(256, 2048) == (256, 384, 512, 768, 1024, 1536, 2048)
    assert batching.sizes(64, 100) == (64, 96, 100)
    key = np.array([0, 7], np.uint32)
    a, b = batching.epoch_order(10, key, 0), batching.epoch_order(10, key, 1)
    assert sorted(a) == list(range(10)) and not np.array_equal(a, b)
    assert np.array_equal(a, batching.epoch_order(10, key, 0))
    lengths = [5, 70, 3, 64, 90]
    ex = data.Examples([np.arange(1, n + 1, dtype=np.int32) for n in lengths],
                       [np.arange(n) >= 2 for n in lengths], 0)
    micros = batching.micro_batches(ex, np.array([0, 1, 2, 3, 4]), 2, (64, 100))
    assert [m["tokens"].shape for m in micros] == [(2, 64), (2, 100), (2, 100)]
    assert micros[0]["mask"].sum(1).tolist() == [3, 5] and micros[2]["mask"].sum(1).tolist() == [90, 0]
    assert np.array_equal(micros[1]["tokens"][1, :70], ex.ids[1]) and not micros[1]["loss"][1, 70:].any()
