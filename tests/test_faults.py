"""Fault injection: damaged checkpoints, non-finite updates, two runs on one folder, killed and read-only
evaluation runs, and small bad inputs. Each test would fail on code that lets the fault pass silently."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import ONE_DEVICE, hf_params, tiny_config

from jax_implicit import checkpoint, train


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
