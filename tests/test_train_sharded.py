"""`train.run` on 8 simulated CPU devices: two optimizer steps on four meshes (and a resume onto another mesh)
end with the parameters of the single-device run, while parameters and Adam moments really are split."""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jax_implicit import convert, train, train_config
from jax_implicit import model as M
from tolerances import assert_reorder_close

ROOT = Path(__file__).resolve().parents[1]

# mesh (data, fsdp, tensor) -> rule table: every table of sharding.RULES on some mesh
MESHES = {(8, 1, 1): "dp", (1, 8, 1): "fsdp", (2, 2, 2): "fsdp_tp", (1, 2, 4): "fsdp_tp"}
# Per-device split of each logical axis on (2, 2, 2) with fsdp_tp, written by hand for the tiny model
# (embed 64, 4 heads, 2 KV heads, mlp 128, vocab 49152); layers, head_dim and norms stay whole.
SPLITS_222 = {"embed": 2, "heads": 2, "kv_heads": 2, "mlp": 2, "vocab": 2}


def tiny_run_config(model_dir, data_dir, out, mesh=(1, 1, 1), rules="fsdp", **train_changes):
    """32 response-tuning LIMA examples cut to 32 tokens (one bucket): 2 steps of 16 in micro-batches of 8."""
    cfg = train_config.default_config()
    cfg.model.path = str(model_dir)
    cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], rules=rules)
    cfg.data.update(path=str(data_dir / "lima/lima_data.jsonl"), mode="response", limit=32, max_seq_length=32,
                    bucket_min=32)
    cfg.optim.update(lr=1e-3, warmup_ratio=0.0)
    cfg.train.update(**{**dict(epochs=1, global_batch=16, micro_batch=8, seed=0, checkpoint_every=1, max_to_keep=2,
                               export_hf=False, out_dir=str(out)), **train_changes})
    return cfg


def host_params(result) -> dict:
    return jax.tree.map(np.asarray, result.state["params"])


@pytest.fixture(scope="module")
def single(tiny_smol_dir, data_dir, tmp_path_factory):
    """The reference: the same run on one device."""
    result = train.run(tiny_run_config(tiny_smol_dir, data_dir, tmp_path_factory.mktemp("single")), jax.devices()[:1])
    assert result.steps == 2 and len(result.state["params"]["embed"].sharding.device_set) == 1
    return result


@pytest.fixture(scope="module")
def runs(tiny_smol_dir, data_dir, tmp_path_factory):
    """Each mesh's run, made once (the (2, 2, 2) one also exports HF weights)."""
    @functools.cache
    def run(mesh):
        out = tmp_path_factory.mktemp("x".join(map(str, mesh)))
        return train.run(tiny_run_config(tiny_smol_dir, data_dir, out, mesh, MESHES[mesh], export_hf=mesh == (2, 2, 2)))
    return run


def assert_params_close(got: dict, want: dict, lr: float = 1e-3, steps: int = 2) -> None:
    """Equal up to float32 reduction order, plus Adam's per-element slack (tests/tolerances.py)."""
    jax.tree.map(lambda a, b: assert_reorder_close(a, b, slack=0.01 * lr * steps), got, want)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_steps_on_a_mesh_equal_one_device(single, runs, tiny_smol_dir, mesh):
    result = runs(mesh)
    assert result.steps == 2 and len(result.state["params"]["embed"].sharding.device_set) == 8
    assert result.final_loss == pytest.approx(single.final_loss, abs=1e-5)
    got, want = host_params(result), host_params(single)
    assert_params_close(got, want)
    # the comparison has teeth: two Adam steps of lr 1e-3 moved the weights far beyond the tolerance
    start = nnx.to_pure_dict(nnx.state(convert.load_hf(tiny_smol_dir)))
    assert np.median(np.abs(want["layers"]["w_up"] - np.asarray(start["layers"]["w_up"]))) > 5e-4


def expected_shard(shape, axes, splits) -> tuple[int, ...]:
    return tuple(n // splits.get(a, 1) for n, a in zip(shape, axes))


def test_params_and_adam_moments_are_split(runs, tiny_smol_dir):
    """On (2, 2, 2): every device holds exactly the hand-computed shard of each parameter and of both moments."""
    result = runs((2, 2, 2))
    axes = M.logical_axes(M.abstract(M.from_hf_config(tiny_smol_dir)))
    adam = result.state["opt_state"][0]
    trees = {"params": result.state["params"], "mu": adam.mu, "nu": adam.nu}
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            ax = functools.reduce(lambda t, k: t[k.key], path, axes)
            want = expected_shard(leaf.shape, ax, SPLITS_222)
            assert {s.data.shape for s in leaf.addressable_shards} == {want}, (name, path, ax)
            assert len(leaf.addressable_shards) == 8
    assert result.state["params"]["layers"]["wk"].addressable_shards[0].data.shape == (2, 32, 1, 16)  # (L, D, K, Dh)
    assert result.state["rng"].sharding.is_fully_replicated
    # the export gathered the shards: HF's tied embedding is the trained one
    hf = load_file(result.hf_dir / "model.safetensors")
    np.testing.assert_array_equal(hf["model.embed_tokens.weight"], np.asarray(result.state["params"]["embed"]))


def test_resume_onto_another_mesh(single, runs, tiny_smol_dir, data_dir, tmp_path):
    """Step 1's checkpoint from (2, 2, 2) restored into the shards of (1, 2, 4) finishes like one device."""
    out = tmp_path / "moved"
    shutil.copytree(runs((2, 2, 2)).out_dir, out)
    shutil.rmtree(out / "checkpoints" / "2")
    shutil.rmtree(out / "hf")
    cfg = tiny_run_config(tiny_smol_dir, data_dir, out, (1, 2, 4), "fsdp_tp")
    with pytest.warns(UserWarning, match=r"different config \(mesh.data, mesh.tensor, train.export_hf\)"):
        result = train.run(cfg)
    assert result.steps == 2
    assert [int(p.name) for p in sorted((out / "checkpoints").iterdir()) if p.name.isdigit()] == [1, 2]
    assert result.state["params"]["layers"]["w_up"].addressable_shards[0].data.shape == (2, 32, 32)  # fsdp 2, tensor 4
    assert_params_close(host_params(result), host_params(single))



@pytest.mark.parametrize("mesh,rules,message", [
    ((3, 1, 1), "fsdp", r"needs 3 devices, but 8 are available"),
    ((1, 8, 1), "zero", r"mesh.rules='zero'; expected one of"),
    ((1, 4, 2), "fsdp", r"tensor=2 are used by no rule"),
])
def test_bad_mesh_is_a_config_error_before_anything_runs(tiny_smol_dir, data_dir, tmp_path, mesh, rules, message):
    with pytest.raises(train_config.ConfigError, match=message):
        train.run(tiny_run_config(tiny_smol_dir, data_dir, tmp_path / "out", mesh, rules))
    assert not (tmp_path / "out").exists()

CONFIG_FILE = """
import json
from pathlib import Path
from ml_collections import ConfigDict

def get_config():
    return ConfigDict(json.loads((Path(__file__).parent / "config.json").read_text()))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(single, tiny_smol_dir, data_dir, tmp_path):
    """`python -m jax_implicit.train` as two jax.distributed processes of 4 CPU devices each on (2, 2, 2):
    each feeds its own rows, orbax saves collectively, process 0 alone logs and writes; the exported
    model equals the single-device run."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_smol_dir, data_dir, out, (2, 2, 2), "fsdp_tp", export_hf=True)
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "two.py").write_text(CONFIG_FILE)
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "jax_implicit.train", f"--config={tmp_path / 'two.py'}"], cwd=ROOT,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "mesh data=2 fsdp=2 tensor=2 (rules fsdp_tp) over 8 devices in 2 processes" in outs[0][1]
    assert "mesh data=2" not in outs[1][1] and "train lima" not in outs[1][1]  # no log lines, no progress bar
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    hf = load_file(out / "hf" / "model.safetensors")
    want = host_params(single)
    assert_params_close({"embed": hf["model.embed_tokens.weight"], "w_up": hf["model.layers.1.mlp.up_proj.weight"]},
                        {"embed": want["embed"], "w_up": want["layers"]["w_up"][1].T})
