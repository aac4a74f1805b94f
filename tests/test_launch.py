"""Launch scripts' dry runs, multi-host start-up from the environment, and a real two-process run on CPU."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_implicit import convert
from jax_implicit import distributed as D
from jax_implicit import model as M

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--config=configs/train/paper.py:llama2_7b,response", "--config.train.out_dir=gs://bucket/it's a run"]


def dry_run(script, *args, env=None, check=True):
    proc = subprocess.run([str(ROOT / "launch" / script), *args, "--dry-run", *TRAIN], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in lines:  # every printed line is a well-formed shell command
        subprocess.run(["bash", "-n", "-c", line], check=True)
    return proc, [shlex.split(line) for line in lines]


def train_argv(argv):
    """The arguments after `-m jax_implicit.train`, checking the interpreter."""
    i = argv.index("jax_implicit.train")
    assert argv[i - 2:i] == [".venv/bin/python", "-m"]
    return argv[i + 1:]


def test_tpu_pod_dry_run():
    _, cmds = dry_run("tpu_pod.sh", "--name=v4-32-a", "--zone=us-central2-b", "--project=proj")
    archive, scp, setup, train = cmds
    assert archive[:2] == ["git", "archive"] and "--output=/tmp/jax_implicit-v4-32-a.tar.gz" in archive
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "v4-32-a:jax_implicit.tar.gz"
    for cmd in (scp, setup, train):
        assert {"--zone=us-central2-b", "--worker=all", "--project=proj"} <= set(cmd)
    for cmd in (setup, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v4-32-a"]
    remote = lambda cmd: shlex.split(next(a for a in cmd if a.startswith("--command="))[len("--command="):])
    assert "jax[tpu]" in remote(setup) and "tar" in remote(setup)
    inner = remote(train)
    assert inner[:3] == ["cd", "~/jax_implicit", "&&"]
    assert train_argv(inner) == TRAIN  # the quote and the spaces survive two levels of quoting

    _, cmds = dry_run("tpu_pod.sh", "--name=v5e", "--zone=z", "--skip-setup")
    assert len(cmds) == 1 and "--project=proj" not in cmds[0]


def test_gpu_host_dry_run():
    _, (setup, train) = dry_run("gpu_host.sh", "--mem-fraction=0.9")
    assert setup[:2] == ["bash", "-c"] and "jax[cuda12]" in shlex.split(setup[2])
    assert train[:2] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"] and train_argv(train) == TRAIN


def test_slurm_dry_run(tmp_path):
    fake = tmp_path / "bin"  # scontrol is the one piece of SLURM we cannot have here
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[017-018]",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    _, (setup, export, srun) = dry_run("slurm.sbatch", env=env)
    assert "jax[cuda12]" in shlex.split(setup[2])
    assert export == ["export", "JAX_COORDINATOR_ADDRESS=gpu017:24242"]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"] and train_argv(srun) == TRAIN
    # what each task then does with SLURM's variables
    task_env = {"JAX_COORDINATOR_ADDRESS": "gpu017:24242", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1"}
    assert D.cluster(task_env) == ("explicit", dict(coordinator_address="gpu017:24242", num_processes=2,
                                                    process_id=1, cluster_detection_method="deactivate"))
    header = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header


def test_launch_bad_arguments():
    proc, _ = dry_run("tpu_pod.sh", "--zone=z", check=False)
    assert proc.returncode == 2 and "--name=... is required" in proc.stderr and not proc.stdout
    proc, _ = dry_run("gpu_host.sh", "--nodes=2", check=False)
    assert proc.returncode == 2 and "unknown option --nodes" in proc.stderr
    proc = subprocess.run([str(ROOT / "launch" / "gpu_host.sh"), "--dry-run", "--config.train.epochs=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "first command argument must be --config=" in proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([str(ROOT / "launch" / "slurm.sbatch"), *TRAIN], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr


@pytest.mark.parametrize("script", ["gpu_host.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_launch_help_and_dry_runs_that_check_the_command_here(script):
    shown = subprocess.run([str(ROOT / "launch" / script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and f"launch/{script}" in shown.stdout
    assert not any(line.startswith("#") for line in shown.stdout.splitlines())
    where = ["--name=n", "--zone=z"] if script == "tpu_pod.sh" else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # also outside an allocation
    for args, message in [
        (["--config=configs/train/paper.py:llama2_7b,respnse"], "not understood: ['respnse']"),
        (["--config=configs/train/paper.py:llama2_7b,response", "--config.train.epoch=3"],
         "unknown setting 'train.epoch'; close matches: train.epochs"),
        (["--config=configs/train/paper.py:llama2_7b,response", "--config.optim.lr=-1"], "optim.lr=-1.0 must be finite and > 0"),
        (["--module=jax_implicit.generate", "--config=configs/generate.py", "--config.decode.max_new_token=9"],
         "close matches: decode.max_new_tokens"),
    ]:
        proc = subprocess.run([str(ROOT / "launch" / script), *where, "--dry-run", *args], capture_output=True,
                              text=True, cwd=ROOT, env=env)
        assert proc.returncode == 2 and message in proc.stderr and not proc.stdout, (args, proc.stderr)
        assert "nothing was run" in proc.stderr
    ok = subprocess.run([str(ROOT / "launch" / script), *where, "--dry-run", "--skip-setup", *TRAIN],
                        capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0 and "jax_implicit.train" in ok.stdout, ok.stderr


def test_cluster_from_environment():
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert D.cluster(explicit)[1]["process_id"] == 3
    assert D.cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, tpu_vm=False) == ("slurm", {})
    assert D.cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, tpu_vm=False) == ("single", {})
    assert D.cluster({}, tpu_vm=True) == ("tpu", {})
    assert D.cluster({}, tpu_vm=False) == ("single", {})
    with pytest.raises(ValueError, match="neither JAX_PROCESS_ID nor SLURM_PROCID"):
        D.cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="process id 4 is not in"):
        D.cluster(dict(explicit, JAX_PROCESS_ID="4"))
    with pytest.raises(ValueError, match="expected host:port"):
        D.cluster(dict(explicit, JAX_COORDINATOR_ADDRESS="10.0.0.1"))
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
        D.cluster(dict(explicit, JAX_NUM_PROCESSES="four"))
    assert D.is_writer()


WORKER = """
import json, sys
import numpy as np
from jax_implicit import distributed
method = distributed.initialize()
import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax_implicit import convert, model as M, pinning
from jax_implicit.sharding import Sharder

tiny, out, ids, mask = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), np.load(sys.argv[4])
sh = Sharder.from_config(dict(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
rows = distributed.local_rows(sh.rows(ids.shape), ids.shape)
batch = sh.global_batch({"ids": ids[rows], "mask": mask[rows]}, len(ids))  # this process's rows only
decoder = sh.load_hf(tiny)  # each process fills only the shards of its own devices
graphdef, params = nnx.split(decoder)
fwd = lambda p, b: nnx.merge(graphdef, p)(b["ids"], M.positions_from_mask(b["mask"]), b["mask"])[0]
with pinning.active(sh):
    logits = jax.jit(fwd, in_shardings=(sh.tree(params, M.logical_axes(decoder)), sh.batch(batch)))(params, batch)
logits = multihost_utils.process_allgather(logits, tiled=True)
convert.export_hf(decoder, out + "/export")  # every process gathers; process 0 writes
if distributed.is_writer():
    np.save(out + "/logits.npy", logits)
print(json.dumps(dict(method=method, process=jax.process_index(), count=jax.process_count(),
                      rows=[rows.start, rows.stop], devices=len(jax.local_devices()))))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_hf, tmp_path):
    """Two real processes (4 CPU devices each) via jax.distributed: per-process rows, shards loaded per
    process, logits and the HF export equal the single-process results; only process 0 writes."""
    tiny = tiny_hf("llama_gqa_tied")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), bool)
    mask[1::2, :4] = False  # left padding on odd rows
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache")}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tiny), str(tmp_path), str(tmp_path / "ids.npy"),
                               str(tmp_path / "mask.npy")], cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [(r["method"], r["process"], r["count"], r["devices"]) for r in reports] == \
        [("explicit", 0, 2, 4), ("explicit", 1, 2, 4)]
    assert [r["rows"] for r in reports] == [[0, 4], [4, 8]]

    ref = convert.load_hf(tiny)
    want = np.asarray(jax.jit(lambda d: d(ids, M.positions_from_mask(mask), mask)[0])(ref))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-5, rtol=1e-5)
    single = load_file(convert.export_hf(ref, tmp_path / "single") / "model.safetensors")
    multi = load_file(tmp_path / "export" / "model.safetensors")
    assert single.keys() == multi.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], multi[name], err_msg=name)
