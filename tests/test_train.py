"""The training loop on a tiny model with SmolLM2's real tokenizer: loss against transformers' own loss,
exact accumulation, loss going down, bit-identical resume after SIGKILL, corrupted checkpoints, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jax_implicit import batching, checkpoint, cli, convert, data, train, train_config, train_step

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs/train/smollm2_cpu.py"


def overrides(model_dir, data_dir, out_dir) -> dict:
    """The tiny run: 8 LIMA responses cut to 64 tokens, batch 4 in micro-batches of 2, 12 steps."""
    return {"model.path": str(model_dir), "data.path": str(data_dir / "lima/lima_data.jsonl"),
            "data.limit": 8, "data.max_seq_length": 64, "data.bucket_min": 64, "optim.lr": 3e-3,
            "optim.warmup_ratio": 0.0, "train.epochs": 6, "train.global_batch": 4, "train.micro_batch": 2,
            "train.seed": 0, "train.checkpoint_every": 1, "train.max_to_keep": 2, "train.out_dir": str(out_dir)}


ONE_DEVICE = jax.devices()[:1]  # these runs are about the loop; tests/test_train_sharded.py runs it on meshes


def tiny_config(model_dir, data_dir, out_dir, **changes):
    cfg = cli.load(f"{CPU_CONFIG}:response")
    for key, value in {**overrides(model_dir, data_dir, out_dir), **changes}.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


@pytest.fixture(scope="module")
def reference(tiny_smol_dir, data_dir, tmp_path_factory):
    """One uninterrupted tiny run (also the loss-goes-down run)."""
    out = tmp_path_factory.mktemp("reference")
    return train.run(tiny_config(tiny_smol_dir, data_dir, out), ONE_DEVICE)


def hf_params(out_dir: Path) -> dict:
    return load_file(out_dir / "hf" / "model.safetensors")


def test_loss_goes_down_and_outputs_exist(reference):
    rows = [json.loads(line) for line in reference.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and reference.steps == 12
    first, last = np.mean([r["loss"] for r in rows[:2]]), np.mean([r["loss"] for r in rows[-2:]])
    assert last < first - 1.0, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens"] > 0 for r in rows)
    assert reference.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hf = AutoModelForCausalLM.from_pretrained(reference.hf_dir, dtype=torch.float32)  # the export loads in HF
    assert hf.config.num_hidden_layers == 2
    assert sorted(p.name for p in (reference.out_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["11", "12"]


def test_export_carries_the_training_format_as_its_chat_template(reference, tiny_smol_dir):
    """SmolLM2's own ChatML template is replaced by the <|user|> format the model was trained on."""
    from transformers import AutoTokenizer

    from jax_implicit import prompts

    tok = AutoTokenizer.from_pretrained(reference.hf_dir)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(tiny_smol_dir).chat_template
    question = " Name three colours.\n"  # the evaluation prompt keeps the instruction as given
    assert tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True) == prompts.generation_prompt(question)
    chat = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello! "}]
    training_text = data.render(chat, "user_assistant", tok.eos_token).strip()
    assert tok.apply_chat_template(chat, tokenize=False) == training_text == "<|user|>\nHi\n<|assistant|>\nHello!" + tok.eos_token
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert list(ids) == list(data.encode(chat, tok, "user_assistant", 64)[0])


def test_loss_and_accumulation_match_transformers(tiny_smol_dir):
    """`example` = the mean of HF's per-example loss (the authors' code); `token` = the mean over all loss
    tokens; both exact when the global batch is split into micro-batches; equal at equal lengths."""
    rng = np.random.default_rng(0)
    lengths, starts = [64, 40, 64, 23], [10, 5, 30, 3]  # loss on tokens from `start` on
    ex = data.Examples([rng.integers(3, 49152, n).astype(np.int32) for n in lengths],
                       [np.arange(n) >= s for n, s in zip(lengths, starts)], 0)
    decoder = convert.load_hf(tiny_smol_dir)
    graphdef, params = nnx.split(decoder)
    params = nnx.to_pure_dict(params)
    micro_step, _ = train_step.build_steps(graphdef, train_step.make_optimizer(train_config.optim_config(), 10))
    hf = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32)

    def ours(indices, micro, reduction, examples=ex):
        micros = batching.micro_batches(examples, np.array(indices), micro, (64,))
        accum, total = train_step.zeros_accum(params), 0.0
        for b, w in zip(micros, train_step.loss_weights(micros, reduction)):
            accum, loss = micro_step(params, accum, dict(tokens=b["tokens"], mask=b["mask"], weights=w))
            total += float(loss)
        return total, accum

    def torch_loss(indices, reduction):
        losses, counts = [], []
        for i in indices:
            labels = torch.tensor(np.where(ex.loss[i], ex.ids[i], -100)[None], dtype=torch.long)
            with torch.no_grad():
                out = hf(input_ids=torch.tensor(ex.ids[i][None], dtype=torch.long), labels=labels)
            losses.append(float(out.loss))
            counts.append(int(ex.loss[i][1:].sum()))
        return np.mean(losses) if reduction == "example" else np.dot(losses, counts) / sum(counts)

    for reduction in ("example", "token"):
        whole, grads_whole = ours([0, 1, 2, 3], 4, reduction)
        split, grads_split = ours([0, 1, 2, 3], 2, reduction)
        assert whole == pytest.approx(torch_loss([0, 1, 2, 3], reduction), abs=2e-5)
        # a few float32 ulps at a loss of ~12 (one ulp is 9.5e-7): the micro-batch's shape picks the matmul
        # kernels and so the summation order (1.4e-6 apart on an Intel Xeon, equal on AMD Zen 4)
        assert split == pytest.approx(whole, abs=4e-6)
        for a, b in zip(jax.tree.leaves(grads_whole), jax.tree.leaves(grads_split)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    example, token = ours([0, 1, 2, 3], 4, "example")[0], ours([0, 1, 2, 3], 4, "token")[0]
    assert abs(example - token) > 1e-3  # unequal lengths: the reductions differ ...
    equal = data.Examples([ex.ids[0], ex.ids[2]], [np.arange(64) >= 10, np.arange(64) >= 10], 0)
    assert ours([0, 1], 2, "example", equal)[0] == pytest.approx(ours([0, 1], 2, "token", equal)[0], abs=1e-6)


def test_gradients_match_transformers_autograd(tiny_smol_dir):
    """The micro-step's gradient of the token-mean loss equals PyTorch's `loss.backward()` through transformers'
    model, tensor by tensor (this covers `projection.contract`'s hand-written backward pass)."""
    ids = np.random.default_rng(1).integers(3, 49152, (4, 64)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    decoder = convert.load_hf(tiny_smol_dir)
    graphdef, params = nnx.split(decoder)
    params = nnx.to_pure_dict(params)
    micro_step, _ = train_step.build_steps(graphdef, train_step.make_optimizer(train_config.optim_config(), 10))
    weights = train_step.loss_weights([dict(loss=mask)], "token")[0]
    grads, _ = micro_step(params, train_step.zeros_accum(params), dict(tokens=ids, mask=mask, weights=weights))
    ours = dict(convert._hf_tensors(nnx.merge(graphdef, grads)))
    hf = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32)
    tokens = torch.tensor(ids, dtype=torch.long)
    hf(input_ids=tokens, labels=tokens).loss.backward()
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max(), err_msg=name)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit()]
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} appeared (exit code {proc.poll()})")


def kill_after_checkpoint(cmd: list[str], out: Path, step: int = 3) -> dict:
    """Run the training command `cmd` until checkpoint `step` is on disk, SIGKILL it; the env to rerun it with."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1.0", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_checkpoint(out, proc, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return env


def test_exact_resume_after_sigkill(reference, tiny_smol_dir, data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jax_implicit.train", f"--config={CPU_CONFIG}:response"]
    cmd += [f"--config.{k}={v}" for k, v in overrides(tiny_smol_dir, data_dir, out).items()]
    env = kill_after_checkpoint(cmd, out)
    assert not (out / "hf").exists(), "the run finished before it was killed"
    killed_at = max(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())
    assert killed_at < 12
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from step {killed_at}" in done.stderr
    ref, got = hf_params(reference.out_dir), hf_params(out)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].dtype == np.float32 and np.array_equal(ref[name], got[name]), name
    losses = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(out) == losses(reference.out_dir)


def corrupt_latest(ckpt_dir: Path) -> int:
    latest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    files = [p for p in (ckpt_dir / str(latest) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    return latest


def test_corrupted_latest_checkpoint_falls_back_and_still_ends_identical(reference, tiny_smol_dir, data_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference.out_dir, out)
    shutil.rmtree(out / "hf")
    latest = corrupt_latest(out / "checkpoints")
    with pytest.warns(UserWarning, match=f"checkpoint step {latest} .* unreadable"):
        result = train.run(tiny_config(tiny_smol_dir, data_dir, out), ONE_DEVICE)
    assert result.steps == 12
    ref, got = hf_params(reference.out_dir), hf_params(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_garbled_checkpoint_meta_is_skipped(tmp_path):
    state = lambda k: {"w": jax.numpy.full((8, 8), float(k)), "rng": jax.random.PRNGKey(k)}  # noqa: E731
    ckpts = checkpoint.Checkpoints(tmp_path, every=1, max_to_keep=3)
    for step in (1, 2):
        ckpts.save(step, state(step), {"step": step})
    ckpts.close()
    (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
    with pytest.warns(UserWarning, match="checkpoint step 2 .* unreadable"):
        restored, meta = checkpoint.Checkpoints(tmp_path, every=1, max_to_keep=3).restore_latest(abstract)
    assert meta == {"step": 1} and float(restored["w"][0, 0]) == 1.0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_smol_dir, data_dir, tmp_path):
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path, **{"optim.lr": 1e30, "train.export_hf": False})
    with pytest.raises(train.TrainingError, match=r"non-finite (loss \(nan\)|update) at step (\d+) .*stopped without "
                       r"updating. Last good checkpoint: step (\d+) in ") as err:
        train.run(cfg, ONE_DEVICE)
    bad, good = map(int, re.search(r"at step (\d+) .* step (\d+) in", str(err.value)).groups())
    assert good == bad - 1
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == good and len(kept) == min(2, good)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, bad)) and all(np.isfinite(m["loss"]) for m in metrics)


class CompileEvents:
    def __init__(self, counted: str = "compil"):
        self.events, self.counted = [], counted

    def __call__(self, event, *args, **kwargs):
        if self.counted in event:
            self.events.append(event)


@pytest.mark.parametrize("change,message", [
    ({"data.name": "lima2"}, "unknown dataset 'lima2'"),
    ({"optim.lrr": 1e-5}, r"unknown setting 'optim.lrr'; close matches: optim.lr"),
    ({"data.max_seq_length": 6}, "none of its 8 examples keeps a response token"),
    ({"data.path": "NOT_JSON"}, r"not JSON Lines: line 1"),
])
def test_bad_input_fails_before_any_compilation(tiny_smol_dir, data_dir, tmp_path, change, message):
    if change.get("data.path") == "NOT_JSON":
        (tmp_path / "data.jsonl").write_text("id,instruction,output\n1,hi,there\n")
        change = {"data.path": str(tmp_path / "data.jsonl")}
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path / "out")
    for key, value in change.items():
        section, name = key.split(".")
        cfg[section][name] = value
    listener = CompileEvents()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ValueError, match=message):
            train.run(cfg)
        assert listener.events == []
        jax.jit(lambda x: x * 3.25 + 0.125)(np.float32(1)).block_until_ready()  # the listener does see compiles
        assert listener.events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not (tmp_path / "out").exists()


def test_paper_configs_cover_every_experiment():
    seen = set()
    for model in ("llama2_7b", "olmo_7b"):
        for task in ("instruction", "response", *data.SINGLE_TASK):
            lima = ("rephrased",) if task in ("instruction", "response") else ()
            for extra in ("5", "7", "10", "15", "20", "seed5", "ab", "authors_schedule", *lima):
                cfg = cli.load(f"{ROOT}/configs/train/paper.py:{model},{task},{extra}")
                train_config.check_config(cfg)
                seen.add(cfg.train.out_dir)
    assert len(seen) > 100
    cfg = cli.load(f"{ROOT}/configs/train/paper.py:olmo_7b,response,15,seed3,ab")
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.seed, cfg.data.tag_set, cfg.data.mode) == \
        (3e-6, 15, 3, "AB", "response")
    with pytest.raises(ValueError, match="not understood: \\['respnse'\\]"):
        cli.load(f"{ROOT}/configs/train/paper.py:llama2_7b,respnse")
    with pytest.raises(ValueError, match="rephrased"):
        cli.load(f"{ROOT}/configs/train/paper.py:llama2_7b,gsm8k,rephrased")
