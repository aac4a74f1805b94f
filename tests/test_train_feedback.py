"""What a researcher watches and keeps from a run: TensorBoard scalars equal to the JSONL metrics, a held-out
loss equal to transformers' loss of the held-out examples under the exported weights, and any saved step
exported to HF by its own command."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jax_implicit import data, train
from test_train import ONE_DEVICE, ROOT, tiny_config


@pytest.fixture(scope="module")
def run(tiny_smol_dir, data_dir, tmp_path_factory):
    """8 examples, 2 held out: 6 trained on in global batches of 4 (2 steps per epoch, 6 steps)."""
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path_factory.mktemp("feedback"), **{
        "train.heldout": 2, "train.eval_every": 4, "train.epochs": 3, "train.max_to_keep": 3})
    return cfg, train.run(cfg, ONE_DEVICE)


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TFRecord event files TensorBoard reads."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_holds_the_jsonl_metrics(run):
    _, result = run
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    board = tensorboard_scalars(result.out_dir / "tensorboard")
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert board[f"train/{name}"] == pytest.approx({r["step"]: r[name] for r in rows}, rel=1e-6), name
    assert all(r["grad_norm"] > 0 for r in rows)


def test_heldout_loss_is_the_loss_of_the_heldout_examples(run, tiny_smol_dir):
    cfg, result = run
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert result.examples == 6 and [r["step"] for r in rows if "heldout_loss" in r] == [4, 6]
    assert tensorboard_scalars(result.out_dir / "tensorboard")["train/heldout_loss"] == pytest.approx(
        {r["step"]: r["heldout_loss"] for r in rows if "heldout_loss" in r}, rel=1e-6)
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    d = cfg.data
    examples = data.tokenize(data.load_rows(d), tok, d.tag_set, d.max_seq_length)
    _, heldout = train._split_heldout(len(examples.ids), 2, cfg.train.seed)
    hf = AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32)  # the final weights
    losses = []
    for i in heldout:
        labels = torch.tensor(np.where(examples.loss[i], examples.ids[i], -100)[None], dtype=torch.long)
        with torch.no_grad():
            losses.append(float(hf(input_ids=torch.tensor(examples.ids[i][None], dtype=torch.long), labels=labels).loss))
    assert rows[-1]["heldout_loss"] == pytest.approx(np.mean(losses), abs=2e-5)  # `example` reduction


def test_export_command_writes_any_saved_step(run):
    _, result = run
    steps = sorted(int(p.name) for p in (result.out_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 5, 6]

    def export(*args: str) -> Path:
        proc = subprocess.run([sys.executable, "-m", "jax_implicit.export", f"--config.run={result.out_dir}", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return Path(proc.stdout.strip().splitlines()[-1])

    newest, earlier = export(), export("--config.step=4")
    assert newest == result.out_dir / "hf-step6" and earlier == result.out_dir / "hf-step4"
    final = load_file(result.hf_dir / "model.safetensors")
    assert all(np.array_equal(final[k], v) for k, v in load_file(newest / "model.safetensors").items())
    assert not all(np.array_equal(final[k], v) for k, v in load_file(earlier / "model.safetensors").items())
    assert (earlier / "tokenizer_config.json").is_file()
    missing = subprocess.run([sys.executable, "-m", "jax_implicit.export", f"--config.run={result.out_dir}",
                              "--config.step=2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1 and "has no step 2" in missing.stderr and "Traceback" not in missing.stderr
