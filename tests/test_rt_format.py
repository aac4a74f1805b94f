"""Response Tuning's chat format (data/README.md, "Response Tuning protocol") on real LIMA rows with the
Llama-2 tokenizer: `<|user|>\\n` + content + `\\n`, `<|assistant|>\\n` + content + EOS + `\\n`, contents not
stripped; in response-tuning mode a single assistant message and no user turn; loss after TRL's marker."""

import json

import pytest

from jax_implicit import data

ROWS = (0, 1, 2)  # rows 1 and 2 have responses with leading/trailing whitespace


@pytest.fixture(scope="module")
def lima(data_dir):
    path = data_dir / "lima/lima_data.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()[:max(ROWS) + 1]]
    load = lambda mode: data.load_rows(data.data_config("lima", str(path), mode, chat_format="rt", limit=max(ROWS) + 1))  # noqa: E731
    return raw, load("response"), load("instruction")


def test_rt_response_mode_has_no_user_turn_unstripped_text_and_eos(lima, llama2_tokenizer):
    tok = llama2_tokenizer
    raw, response_rows, _ = lima
    for r in ROWS:
        answer = raw[r]["messages"][1]["content"]
        assert response_rows[r]["messages"] == [{"role": "assistant", "content": answer}]
        ids, loss = data.encode_rt(response_rows[r]["messages"], tok, 2048)
        assert ids.tolist() == tok("<|assistant|>\n" + answer + "</s>\n")["input_ids"]
        assert "<|user|>" not in tok.decode(ids)
        head = len(tok("<|assistant|>\n")["input_ids"])  # BOS and the tag: no loss; the rest all has it
        assert not loss[:head].any() and loss[head:].all()
        assert ids[loss][-2:].tolist() == [tok.eos_token_id, tok.convert_tokens_to_ids("<0x0A>")]  # EOS, then "\n"
    assert any(m["content"] != m["content"].strip() for r in ROWS for m in response_rows[r]["messages"])


def test_rt_instruction_mode_trains_on_the_response_only(lima, llama2_tokenizer):
    tok = llama2_tokenizer
    raw, _, rows = lima
    for r in ROWS:
        question, answer = (m["content"] for m in raw[r]["messages"])
        ids, loss = data.encode_rt(rows[r]["messages"], tok, 2048)
        text = "<|user|>\n" + question + "\n<|assistant|>\n" + answer + "</s>\n"
        assert ids.tolist() == tok(text)["input_ids"]
        n_loss = len(ids) - len(tok("<|user|>\n" + question + "\n<|assistant|>\n")["input_ids"])
        assert loss.sum() == n_loss and loss[-n_loss:].all()


def test_unknown_chat_format_is_named(data_dir):
    with pytest.raises(data.DataError, match="chat format 'tulu'"):
        data.load_rows(data.data_config("lima", str(data_dir / "lima/lima_data.jsonl"), chat_format="tulu"))


def test_rt_chat_template_reproduces_the_rt_text(lima, llama2_tokenizer):
    """The template an RT run's export carries renders what `encode_rt` tokenized, and RT's generation prompt."""
    from jax_implicit import prompts

    tok = llama2_tokenizer
    raw, _, rows = lima
    template = prompts.chat_template(chat_format="rt")
    for r in ROWS:
        text = tok.apply_chat_template(rows[r]["messages"], chat_template=template, tokenize=False)
        assert tok(text)["input_ids"] == data.encode_rt(rows[r]["messages"], tok, 4096)[0].tolist()
    question = raw[1]["messages"][0]["content"]
    assert tok.apply_chat_template([{"role": "user", "content": question}], chat_template=template, tokenize=False,
                                   add_generation_prompt=True) == "<|user|>\n" + question + "\n<|assistant|>\n"
