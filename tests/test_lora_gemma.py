"""Response tuning with LoRA and QLoRA on the real Gemma-3-270M base (configs/train/rt.py:gemma3_270m_cpu,
cut to a few steps over the same four LIMA responses): the response loss goes down, and the merged HF
export, reloaded in transformers, decodes greedily exactly as our decoder with the trained adapters."""

import json

import numpy as np
import pytest
import torch
from test_train import ONE_DEVICE, ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from jax_implicit import cli, convert, decode, lora, train

PROMPTS = ["<|user|>\nName three primary colors.\n<|assistant|>\n", "<|user|>\nWhat is 7 times 8?\n<|assistant|>\n"]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["lora", "nf4"])
def test_gemma3_270m_rt_run_lowers_loss_and_merged_export_decodes_alike(storage, gemma3_270m_dir, data_dir, tmp_path):
    cfg = cli.load(f"{ROOT}/configs/train/rt.py:gemma3_270m_cpu,response" + (",lora" * (storage == "lora")))
    cfg.model.path = str(gemma3_270m_dir)
    cfg.data.update(path=str(data_dir / "lima/lima_data.jsonl"), limit=4, max_seq_length=64, bucket_min=64)
    cfg.optim.lr = 1e-3  # RT's 1e-4 is for 10 epochs of LIMA; here 3 steps over the same 4 rows
    cfg.train.update(epochs=3, global_batch=4, micro_batch=4, checkpoint_every=100, out_dir=str(tmp_path / "run"))
    result = train.run(cfg, ONE_DEVICE)
    losses = [json.loads(line)["loss"] for line in result.metrics.read_text().splitlines()]
    print(f"{storage}: response loss per step {losses}")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05

    ours = lora.with_adapters(convert.load_hf(gemma3_270m_dir), cfg.lora, result.state["params"])
    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_dir)
    enc = tokenizer(PROMPTS, return_tensors="np", padding=True, padding_side="left")
    tokens, lengths = decode.generate(ours, enc["input_ids"], enc["attention_mask"].astype(bool), max_new_tokens=12,
                                      eos_ids=ours.cfg.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32)
    for r, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        assert np.asarray(tokens[r, :int(lengths[r])]).tolist() == ref.tolist()[:int(lengths[r])], prompt
