"""Multi-host start-up: `jax.distributed.initialize` from the environment, who writes, which rows each process loads.

Call `initialize()` first thing in a command, before anything touches a device. How it decides:
- explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`, or SLURM's `SLURM_NTASKS` and `SLURM_PROCID` in their place (`launch/slurm.sbatch`:
  one process per node drives all its GPUs); `JAX_LOCAL_DEVICE_IDS` is read by JAX itself;
- SLURM alone (`SLURM_JOB_ID`, `SLURM_NTASKS` > 1): JAX's own detection, one process per GPU;
- TPU VM: JAX asks the metadata server for the pod's workers (one process per host; a single-host
  slice such as v4-8 becomes a one-process "cluster");
- otherwise a single process, nothing to initialise.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import jax


def on_tpu_vm() -> bool:
    """TPU chips are visible: /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cluster(env: Mapping[str, str] = os.environ, tpu_vm: bool | None = None) -> tuple[str, dict]:
    """(method, kwargs for `jax.distributed.initialize`); method is explicit, slurm, tpu or single."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        address = env["JAX_COORDINATOR_ADDRESS"]
        if ":" not in address:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port")
        values = {}
        for name, fallback in (("JAX_NUM_PROCESSES", "SLURM_NTASKS"), ("JAX_PROCESS_ID", "SLURM_PROCID")):
            raw = env.get(name) or env.get(fallback)
            if raw is None:
                raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but neither {name} nor {fallback} is")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name if env.get(name) else fallback}={raw!r} is not an integer") from None
        n, pid = values["JAX_NUM_PROCESSES"], values["JAX_PROCESS_ID"]
        if not 0 <= pid < n:
            raise ValueError(f"process id {pid} is not in [0, {n})")
        # "deactivate": under SLURM, JAX would otherwise give each process a single GPU
        return "explicit", dict(coordinator_address=address, num_processes=n, process_id=pid,
                                cluster_detection_method="deactivate")
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm", {}
    if on_tpu_vm() if tpu_vm is None else tpu_vm:
        return "tpu", {}
    return "single", {}


def initialize(env: Mapping[str, str] = os.environ) -> str:
    """Start the distributed runtime if this is one process of many; returns the method used."""
    method, kwargs = cluster(env)
    if method != "single":
        jax.distributed.initialize(**kwargs)
    return method


def is_writer() -> bool:
    """Only process 0 writes logs, metrics, checkpoints' metadata and HF exports (orbax coordinates the rest)."""
    return jax.process_index() == 0


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> slice:
    """The block of global batch rows that this process's devices hold under `sharding`: what its loader reads.

    Every process builds the same global batch order (same seed) and reads only these rows, so the
    data seen per step does not depend on the number of hosts.
    """
    spans = sorted({(i[0].start or 0, shape[0] if i[0].stop is None else i[0].stop)
                    for i in sharding.addressable_devices_indices_map(shape).values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"{sharding} gives this process non-contiguous rows {spans} of a batch of {shape[0]}")
    return slice(spans[0][0], spans[-1][1])
