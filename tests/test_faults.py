"""Fault injection: damaged checkpoints, non-finite updates, two runs on one folder, killed and read-only
evaluation runs, and small bad inputs. Each test would fail on code that lets the fault pass silently."""

import asyncio
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer
from test_train import CPU_CONFIG, ONE_DEVICE, ROOT, CompileEvents, corrupt_latest, hf_params, overrides, tiny_config

from jax_implicit import checkpoint, data, decode, generate, partial, runlock, serving, train, train_config
from jax_implicit.evaluate import ranking, scoring


@pytest.fixture(scope="module")
def undisturbed(tiny_smol_dir, data_dir, tmp_path_factory):
    """One uninterrupted tiny run (12 steps, a checkpoint every step, the last two kept)."""
    return train.run(tiny_config(tiny_smol_dir, data_dir, tmp_path_factory.mktemp("undisturbed")), ONE_DEVICE)


def flip_bit(path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_fingerprint_sees_one_flipped_bit_and_ignores_the_mesh():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 24), jnp.float32)
    state = {"w": x, "h": x[:8].astype(jnp.bfloat16), "count": jnp.int32(7), "rng": jax.random.PRNGKey(3)}
    prints, bad = checkpoint.fingerprint(state)
    assert bad == [] and len(prints) == 4
    raw = np.asarray(x).view(np.uint32).copy()
    for flat in (0, 17, 383):
        for bit in (0, 13, 31):
            damaged = raw.copy()
            damaged.flat[flat] ^= np.uint32(1 << bit)
            got, _ = checkpoint.fingerprint({**state, "w": jnp.asarray(damaged.view(np.float32))})
            assert got["['w']"] != prints["['w']"] and got["['h']"] == prints["['h']"], (flat, bit)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    spread = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert checkpoint.fingerprint({**state, "w": spread})[0] == prints
    nan = x.at[3, 4].set(jnp.nan)
    assert checkpoint.fingerprint({**state, "w": nan})[1] == ["['w']"]


def test_flipped_bit_in_newest_checkpoint_falls_back_and_resaves(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    """One flipped bit in the array data of the newest checkpoint: a one-line warning naming the step and
    the reason, the damaged copy moved aside, the step retrained and saved again, the result bit-identical."""
    out = shutil.copytree(undisturbed.out_dir, tmp_path / "run")
    shutil.rmtree(out / "hf")
    newest = out / "checkpoints" / "12"
    biggest = max((p for p in (newest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip_bit(biggest, biggest.stat().st_size // 2, bit=3)
    with pytest.warns(UserWarning) as caught:
        result = train.run(tiny_config(tiny_smol_dir, data_dir, out), ONE_DEVICE)
    damage = [str(w.message) for w in caught if "checkpoint step" in str(w.message)]
    assert len(damage) == 1 and "\n" not in damage[0], damage
    assert "checkpoint step 12 " in damage[0] and "differ from what was saved" in damage[0], damage[0]
    assert result.steps == 12
    ref, got = hf_params(undisturbed.out_dir), hf_params(out)
    assert sorted(ref) == sorted(got) and all(np.array_equal(ref[k], got[k]) for k in ref)
    assert (out / "checkpoints.damaged" / "12" / "state").is_dir()  # kept for a look, out of orbax's sight
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["11", "12"]
    ckpts = checkpoint.Checkpoints(out / "checkpoints", 1, 2)  # the re-saved step is intact
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state)
    state, meta = ckpts.restore_latest(abstract)
    ckpts.close()
    assert meta["step"] == 12
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(result.state)))


def fails_before_compiling(fn, error, match: str, counted: str = "compil"):
    """`fn()` raises `error` with a one-line message matching `match`, and nothing was compiled first (no JAX
    event whose name holds `counted`: by default tracing too)."""
    listener = CompileEvents(counted)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(error, match=match) as caught:
            fn()
        assert listener.events == [], listener.events
        jax.jit(lambda x: x * 1.75 - 0.5)(np.float32(2)).block_until_ready()  # the listener does see compiles
        assert listener.events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "\n" not in str(caught.value)
    return caught.value


def restore_all(ckpt_dir, like):
    """Every kept step of a run folder, verified (fingerprints and finiteness); a damaged one would warn."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    ckpts = checkpoint.Checkpoints(ckpt_dir, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, meta = ckpts.restore_latest(abstract)
    ckpts.close()
    return state, meta


def test_nonfinite_update_is_never_applied_or_saved(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    """lr=1e30 passes the config check, and its second update overflows: the run stops naming the step and
    the batch's examples; the update was not applied, and the last checkpoint is intact and finite."""
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path, **{"optim.lr": 1e30, "train.export_hf": False})
    with pytest.raises(train.TrainingError) as err:
        train.run(cfg, ONE_DEVICE)
    message = str(err.value)
    assert "\n" not in message
    bad, names, good = re.search(r"non-finite \S+.* at step (\d+) \(epoch 0, batch \d, examples (lima_\d+(?:, "
                                 r"lima_\d+){3})\); stopped without updating. Last good checkpoint: step (\d+)",
                                 message).groups()
    assert int(good) == int(bad) - 1 >= 1
    state, meta = restore_all(tmp_path / "checkpoints", undisturbed.state)
    assert meta["step"] == int(good)


def test_nonfinite_update_can_be_skipped_and_counted(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path, **{"optim.lr": 1e30, "train.export_hf": False,
                                                            "train.nonfinite": "skip"})
    with pytest.warns(UserWarning, match=r"skipped, the state kept as it was \(1 skipped so far\)"):
        result = train.run(cfg, ONE_DEVICE)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert result.steps == 12 and skipped and skipped[-1] == 12 and 1 not in skipped
    assert bool(checkpoint.all_finite(result.state))
    state, meta = restore_all(tmp_path / "checkpoints", undisturbed.state)
    assert meta["step"] == 12
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(result.state)))


@pytest.fixture(scope="module")
def oov_setup(tiny_smol_dir, data_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has one added token the model has no embedding row for,
    and 8 LIMA rows of which row 5's response holds that token."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("oov")
    model = shutil.copytree(tiny_smol_dir, folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<|oov|>"])
    tokenizer.save_pretrained(model)
    rows = [json.loads(x) for x in (data_dir / "lima/lima_data.jsonl").read_text().splitlines()[:8]]
    rows[5]["messages"][1]["content"] = "Sure. <|oov|> " + rows[5]["messages"][1]["content"]
    path = folder / "lima.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, path


@pytest.mark.parametrize("change,error,message", [
    ({"optim.lr": float("inf")}, train_config.ConfigError, r"optim.lr=inf must be finite and > 0"),
    ({"optim.lr": float("nan")}, train_config.ConfigError, r"optim.lr=nan must be finite and > 0"),
    ({"train.nonfinite": "ignore"}, train_config.ConfigError, r"train.nonfinite='ignore'; expected one of"),
    ("OOV", data.DataError, r"lima.jsonl row 5 \(id 'lima_5'\): token id 49152 \('<\|oov\|>'\) is outside the "
                            r"model's vocabulary of 49152"),
])
def test_bad_training_input_fails_in_one_line_before_compiling(tiny_smol_dir, data_dir, tmp_path, oov_setup,
                                                               change, error, message):
    if change == "OOV":
        change = {"model.path": str(oov_setup[0]), "data.path": str(oov_setup[1])}
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path / "out", **change)
    fails_before_compiling(lambda: train.run(cfg, ONE_DEVICE), error, message)
    assert not (tmp_path / "out").exists()


def train_command(model, data_dir, out, **changes) -> list[str]:
    """The tiny run of test_train.py as a command line."""
    settings = {**overrides(model, data_dir, out), **changes}
    return [sys.executable, "-m", "jax_implicit.train", f"--config={CPU_CONFIG}:response",
            *(f"--config.{k}={v}" for k, v in settings.items())]


CLI_ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1.0", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def test_second_run_on_a_folder_refuses_at_once(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    """While one run trains in a folder, a second (another seed and lr) fails before compiling anything,
    naming the first's PID and host and touching nothing; the first ends bit-identical to a lone run."""
    out = tmp_path / "shared"
    first = subprocess.Popen(train_command(tiny_smol_dir, data_dir, out), cwd=ROOT, env=CLI_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while f"pid {first.pid} " not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = tiny_config(tiny_smol_dir, data_dir, out, **{"train.seed": 1, "optim.lr": 1e-3})
        fails_before_compiling(lambda: train.run(second, ONE_DEVICE), runlock.Busy,
                               rf"training folder {out} is in use by pid {first.pid} on host "
                               rf"{re.escape(socket.gethostname())} since ")
        log, _ = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0, log[-3000:]
    ref, got = hf_params(undisturbed.out_dir), hf_params(out)
    assert sorted(ref) == sorted(got) and all(np.array_equal(ref[k], got[k]) for k in ref)
    assert (out / "metrics.jsonl").read_text().count("\n") == 12
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 0


def test_resuming_with_another_config_is_an_error_unless_allowed(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    out = shutil.copytree(undisturbed.out_dir, tmp_path / "run")
    changed = tiny_config(tiny_smol_dir, data_dir, out, **{"optim.lr": 1e-3, "train.export_hf": False})
    fails_before_compiling(lambda: train.run(changed, ONE_DEVICE), train_config.ConfigError,
                           rf"{out} was started with a different config \(optim.lr\): resuming it "
                           r"would match neither run; use another train.out_dir, or set train.allow_config_change=True")
    changed.train.allow_config_change = True
    with pytest.warns(UserWarning, match=r"different config \(optim.lr, train.allow_config_change, train.export_hf\)"):
        assert train.run(changed, ONE_DEVICE).steps == 12
    (out / "config.json").write_text('{"model": {"path": ')  # cut short
    fails_before_compiling(lambda: train.run(changed, ONE_DEVICE), train_config.ConfigError,
                           rf"{out}/config.json is damaged \(Expecting value: line 1 column 20 \(char 19\)\); "
                           r"restore it or move the run folder away")


def test_partial_file_drops_a_torn_tail_and_refuses_other_settings(tmp_path):
    path = tmp_path / "out.json.partial"
    keep = partial.Partial(path, {"model": "a"})
    keep.add(["0", "1"], ["x", {"y": 1.5}])
    keep.add(["2"], ["z"])
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # killed in the middle of the last batch's write
    again = partial.Partial(path, {"model": "a"})
    assert again.items == {"0": "x", "1": {"y": 1.5}} and again.get(["0", "1"]) == ["x", {"y": 1.5}]
    assert again.get(["1", "2"]) is None and path.read_bytes() == whole[:whole.rindex(b"\n", 0, -1) + 1]
    with pytest.raises(ValueError, match=r"out.json.partial holds work done with other settings or inputs"):
        partial.Partial(path, {"model": "b"})
    again.finish()
    assert not path.exists()


class Interrupt(Exception):
    """Stands in for a kill after some batches (their results are on disk, as after SIGKILL)."""


def interrupt_after(monkeypatch, module, name: str, calls: int) -> list:
    """Make `module.name` raise after `calls` calls; returns the list the calls are counted in."""
    real, seen = getattr(module, name), []

    def counted(*args, **kwargs):
        if len(seen) == calls:
            raise Interrupt
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return seen


def generate_config(model_dir, instructions, output):
    from configs.generate import get_config

    cfg = get_config("no_rules")
    cfg.model.path, cfg.data.instructions, cfg.output = str(model_dir), str(instructions), str(output)
    cfg.decode.max_new_tokens, cfg.decode.batch_size, cfg.decode.bucket = 4, 2, 16
    return cfg


@pytest.fixture()
def instructions(tmp_path):
    path = tmp_path / "instructions.jsonl"
    texts = ["Name a color.", "What is 2 + 2?", "Say hi.", "Write one word about the sea, please.", "Why?"]
    path.write_text("".join(json.dumps({"instruction": i}) + "\n" for i in texts))
    return path


def test_generate_killed_midway_resumes_to_identical_output(tiny_smol_dir, instructions, tmp_path, monkeypatch):
    whole = generate.run(generate_config(tiny_smol_dir, instructions, tmp_path / "whole" / "out.json"))
    cfg = generate_config(tiny_smol_dir, instructions, tmp_path / "killed" / "out.json")
    monkeypatch.setattr(serving, "QUEUED_PER_SLOT", 1)  # continuous batching returns work every 2 prompts here
    calls = interrupt_after(monkeypatch, decode, "serve_queue", 99)
    generate.run(generate_config(tiny_smol_dir, instructions, tmp_path / "counted" / "out.json"))
    monkeypatch.undo()
    monkeypatch.setattr(serving, "QUEUED_PER_SLOT", 1)
    interrupt_after(monkeypatch, decode, "serve_queue", 1)
    with pytest.raises(Interrupt):
        generate.run(cfg)
    kept = partial.path_for(cfg.output)
    first = len(kept.read_text().splitlines()) - 1  # the rows of the first call, after the header
    assert 1 <= first < 5 and not Path(cfg.output).exists()
    monkeypatch.undo()
    monkeypatch.setattr(serving, "QUEUED_PER_SLOT", 1)
    decoded = interrupt_after(monkeypatch, decode, "serve_queue", 99)
    assert generate.run(cfg).read_bytes() == whole.read_bytes()
    assert len(calls) >= 2 and len(decoded) < len(calls) and not kept.exists()  # the first call's work was kept


def test_generate_sigkilled_midway_resumes_to_identical_output(tiny_smol_dir, tmp_path):
    """The real thing from the command line: SIGKILL once the first call's responses are kept. One slot takes
    `QUEUED_PER_SLOT` prompts a call, so the short instructions fill the first call and the long one is
    the second's alone; with no compile cache, the second call waits on a compilation."""
    instructions = tmp_path / "instructions.jsonl"
    texts = [f"Name color {i}." for i in range(serving.QUEUED_PER_SLOT)]
    texts.append("Write one long sentence about the sea, " * 3)
    instructions.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    cfg = generate_config(tiny_smol_dir, instructions, tmp_path / "killed" / "out.json")
    cfg.decode.batch_size = 1
    command = [sys.executable, "-m", "jax_implicit.generate", f"--config={ROOT}/configs/generate.py:no_rules",
               *(f"--config.{k}={v}" for k, v in (("model.path", cfg.model.path), ("data.instructions", instructions),
                                                  ("output", cfg.output), ("decode.max_new_tokens", 4),
                                                  ("decode.batch_size", 1), ("decode.bucket", 16)))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kept, deadline = partial.path_for(cfg.output), time.time() + 600
    while not (kept.exists() and kept.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not Path(cfg.output).exists(), "the run finished before it was killed"
    whole = generate_config(tiny_smol_dir, instructions, tmp_path / "whole" / "out.json")
    whole.decode.batch_size = 1
    assert generate.run(cfg).read_bytes() == generate.run(whole).read_bytes()
    assert not kept.exists()


def ranking_cfg(model_dir, data_dir, results):
    from configs.eval import ranking as ranking_config

    cfg = ranking_config.get_config()
    cfg.model.path, cfg.data = str(model_dir), str(data_dir / "dolly" / "dolly_train.json")
    cfg.n, cfg.k, cfg.run.seed, cfg.batch_tokens = 3, 1, 0, 256
    cfg.run.results, cfg.run.base, cfg.run.method = str(results), "tiny", "base"
    return cfg


def test_ranking_killed_midway_resumes_to_identical_output(tiny_smol_dir, data_dir, tmp_path, monkeypatch):
    batches = interrupt_after(monkeypatch, scoring, "_continuation", 99)
    ranking.run(ranking_cfg(tiny_smol_dir, data_dir, tmp_path / "whole"))
    monkeypatch.undo()
    cfg = ranking_cfg(tiny_smol_dir, data_dir, tmp_path / "killed")
    interrupt_after(monkeypatch, scoring, "_continuation", 1)
    with pytest.raises(Interrupt):
        ranking.run(cfg)
    monkeypatch.undo()
    scored = interrupt_after(monkeypatch, scoring, "_continuation", 99)
    ranking.run(cfg)
    name = Path("tiny/base/seed0/ranking.json")
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert len(batches) >= 3 and len(scored) == len(batches) - 1  # the first batch was kept
    assert not partial.path_for(tmp_path / "killed" / name).exists()


def test_judge_killed_midway_resumes_to_identical_judgements(tiny_smol_dir, tmp_path, monkeypatch):
    from jax_implicit import convert
    from jax_implicit.evaluate import judge

    decoder = convert.load_hf(tiny_smol_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_smol_dir)
    pairs = [(f"<|im_start|>user\nA{'.' * i} or B?<|im_end|>", f"<|im_start|>user\nB or A{'!' * i}?<|im_end|>")
             for i in range(0, 60, 12)]

    def local(keep=None):
        return judge.LocalJudge(decoder, tokenizer, name="tiny", batch_tokens=64, keep=keep)

    batches = interrupt_after(monkeypatch, scoring, "_next_token", 99)
    whole = local().probabilities(pairs)
    monkeypatch.undo()
    path = tmp_path / "judge.partial"
    interrupt_after(monkeypatch, scoring, "_next_token", 1)
    with pytest.raises(Interrupt):
        local(partial.Partial(path, "tiny")).probabilities(pairs)
    monkeypatch.undo()
    judged = interrupt_after(monkeypatch, scoring, "_next_token", 99)
    resumed = local(partial.Partial(path, "tiny")).probabilities(pairs)
    assert np.array_equal(resumed, whole) and len(batches) >= 3 and len(judged) == len(batches) - 1


@pytest.mark.parametrize("fault", ["parent is a file", "output in use"])
def test_unwritable_or_busy_output_fails_before_the_model_loads(tiny_smol_dir, data_dir, instructions, tmp_path,
                                                                monkeypatch, fault):
    from jax_implicit import convert

    monkeypatch.setattr(convert, "load_hf", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" if fault == "parent is a file" else tmp_path / "out"
    gen = generate_config(tiny_smol_dir, instructions, folder / "out.json")
    rank = ranking_cfg(tiny_smol_dir, data_dir, folder)
    rank.out = str(folder / "ranking.json")
    for run, output in ((generate.run, gen.output), (ranking.run, rank.out)):
        if fault == "output in use":
            with runlock.hold(runlock.beside(output), "it"):
                with pytest.raises(runlock.Busy, match=rf"output {output} is in use by pid {os.getpid()} on host "):
                    run(gen if run is generate.run else rank)
        else:
            with pytest.raises(runlock.Unwritable, match=rf"cannot write output {output}: {folder} is not a writable "
                                                         r"folder \((FileExistsError|NotADirectoryError)"):
                run(gen if run is generate.run else rank)


@pytest.fixture(scope="module")
def broken_inputs(tiny_smol_dir, tmp_path_factory):
    """A non-UTF-8 data file, a model folder without a tokenizer and one with a NaN weight."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "latin1.jsonl").write_bytes('{"messages": [{"role": "assistant", "content": "caf\\u00e9"}]}\n'
                                          .encode().replace(b"\\u00e9", "é".encode("latin-1")))
    bare = folder / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_smol_dir / name, bare / name)
    nan = shutil.copytree(tiny_smol_dir, folder / "nan_weights")
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("change,error,message", [
    ({"data.limit": -5}, train_config.ConfigError, r"data.limit=-5 must be >= 0 \(0: every example\)"),
    ({"data.max_seq_length": 512}, train_config.ConfigError, r"data.max_seq_length=512 exceeds the context of .* \(256 "
                                                      r"positions\)"),
    ({"train.checkpoint_every": 0}, train_config.ConfigError, r"train.checkpoint_every=0 and train.max_to_keep=2 must be"),
    ({"train.max_to_keep": 0}, train_config.ConfigError, r"train.checkpoint_every=1 and train.max_to_keep=0 must be >= 1"),
    ({"data.path": "latin1.jsonl"}, data.DataError, r"data file .*latin1.jsonl is not UTF-8 text \(byte 51: invalid"),
    ({"model.path": "no_tokenizer"}, train_config.ConfigError, r"no_tokenizer holds no tokenizer \(none of tokenizer.json, "),
])
def test_small_training_faults_fail_in_one_line_before_the_folder_or_compiling(tiny_smol_dir, data_dir, tmp_path,
                                                                               broken_inputs, change, error, message):
    change = {k: str(broken_inputs / v) if k.endswith("path") else v for k, v in change.items()}
    cfg = tiny_config(tiny_smol_dir, data_dir, tmp_path / "out", **change)
    fails_before_compiling(lambda: train.run(cfg, ONE_DEVICE), error, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"decode.batch_size": 0}, r"decode.batch_size=0 must be a positive integer"),
    ({"decode.bucket": 0}, r"decode.bucket=0 must be a positive integer"),
    ({"decode.temperature": -0.5}, r"need decode.temperature >= 0 and 0 < decode.top_p <= 1, got -0.5, 1.0"),
])
def test_small_generation_faults_fail_in_one_line_before_compiling(tiny_smol_dir, instructions, broken_inputs,
                                                                   tmp_path, change, message):
    cfg = generate_config(tiny_smol_dir, instructions, tmp_path / "out" / "out.json")
    for key, value in change.items():
        section, name = key.split(".")
        cfg[section][name] = str(broken_inputs / value) if name == "path" else value
    fails_before_compiling(lambda: generate.run(cfg), ValueError, message)
    assert not (tmp_path / "out" / "out.json").exists()


def test_nan_weights_are_named_while_loading_before_any_decoding(broken_inputs, instructions, tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "serve_queue", lambda *a, **k: pytest.fail("decoded with NaN weights"))
    cfg = generate_config(broken_inputs / "nan_weights", instructions, tmp_path / "out.json")
    fails_before_compiling(lambda: generate.run(cfg), ValueError,  # the model's shapes are traced, nothing compiled
                           r"nan_weights: tensor model.layers.1.mlp.up_proj.weight holds non-finite values$",
                           counted="backend_compile")
    assert not (tmp_path / "out.json").exists()


def test_results_cannot_be_written_outside_the_results_folder(tiny_smol_dir, data_dir, tmp_path):
    cfg = ranking_cfg(tiny_smol_dir, data_dir, tmp_path / "results")
    cfg.run.base = ".."
    with pytest.raises(ValueError, match=r"run.base='..': give a non-empty folder name"):
        ranking.run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_damaged_metrics_line_is_named_and_a_killed_export_is_cleaned(undisturbed, tiny_smol_dir, data_dir,
                                                                       tmp_path):
    out = shutil.copytree(undisturbed.out_dir, tmp_path / "run")
    shutil.rmtree(out / "hf")
    stale = out / ".hf.tmp-killed"
    stale.mkdir()
    (stale / "part-0").write_bytes(b"half an export")
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(metrics[:3] + ['{"step": 4, "lo'] + metrics[4:]) + "\n")
    cfg = tiny_config(tiny_smol_dir, data_dir, out)
    fails_before_compiling(lambda: train.run(cfg, ONE_DEVICE), train_config.ConfigError,
                           r"metrics.jsonl line 4 is damaged; repair or delete that line to resume")
    (out / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    assert train.run(cfg, ONE_DEVICE).hf_dir == out / "hf"
    assert not stale.exists() and hf_params(out).keys() == hf_params(undisturbed.out_dir).keys()


def test_unreadable_checkpoint_leaves_stderr_readable(undisturbed, tiny_smol_dir, data_dir, tmp_path):
    """A truncated newest checkpoint, resumed from the command line: one warning line, no cascade of
    `Event loop is closed` tracebacks from the reads that were still in flight."""
    out = shutil.copytree(undisturbed.out_dir, tmp_path / "run")
    shutil.rmtree(out / "hf")
    latest = corrupt_latest(out / "checkpoints")
    done = subprocess.run(train_command(tiny_smol_dir, data_dir, out), cwd=ROOT, env=CLI_ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "UserWarning" in line]
    assert len(warned) == 1 and f"checkpoint step {latest} in {out}/checkpoints is unreadable (" in warned[0]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
    ref, got = hf_params(undisturbed.out_dir), hf_params(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_reads_that_also_failed_in_orbax_tasks_are_not_logged_again(caplog):
    """When a damaged step fails several of orbax's concurrent reads, the first failure reaches the caller and
    its warning; the others are collected unretrieved, and asyncio would log each with its whole traceback
    (which made the test above fail now and then). Failures raised outside orbax are still logged."""
    from orbax.checkpoint._src.serialization import serialization

    async def elsewhere():
        raise ValueError("raised outside orbax")

    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(serialization.async_deserialize(None, {})), loop.create_task(elsewhere())]
    loop.run_until_complete(asyncio.wait(tasks))
    loop.close()
    del tasks
    gc.collect()
    logged = [r for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and "raised outside orbax" in logged[0].getMessage(), [r.getMessage() for r in logged]


def test_checkpoint_saved_before_fingerprints_still_restores_with_a_warning(tmp_path):
    """Runs started by an older version keep their checkpoints: no fingerprints, so only shapes and finiteness."""
    state = {"w": jnp.arange(12.0).reshape(3, 4), "rng": jax.random.PRNGKey(1)}
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 5})))
    manager.wait_until_finished()
    manager.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpts = checkpoint.Checkpoints(tmp_path, every=1, max_to_keep=2)
    with pytest.warns(UserWarning, match=r"checkpoint step 5 in .* was saved without fingerprints \(by an older "
                                         r"version\): restored with only its shapes and finiteness checked"):
        restored, meta = ckpts.restore_latest(abstract)
    ckpts.close()
    assert meta == {"step": 5} and np.array_equal(restored["w"], state["w"])


def test_a_full_disk_stops_training_in_a_few_readable_lines(tiny_smol_dir, data_dir, tmp_path):
    """Writes past a file-size limit fail in orbax's writer threads as a full disk does (EFBIG for ENOSPC): each
    thread logs one line, the run stops with a one-line error, no traceback, and no half-written step is left."""
    env = {k: v for k, v in CLI_ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the cache's writes would fail too
    limited = ["bash", "-c", 'ulimit -f 1024 && trap "" XFSZ && exec "$@"', "-"]  # 1 MiB per file; EFBIG, no signal
    proc = subprocess.run(limited + train_command(tiny_smol_dir, data_dir, tmp_path / "run"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) < 30, proc.stderr[-3000:]
    assert lines[-1].startswith("jax_implicit.train: error: ") and "Error writing" in lines[-1]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
