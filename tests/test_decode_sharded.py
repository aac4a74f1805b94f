"""The compiled decoder with the three rules, run on device meshes, gives the single-device tokens."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from jax_implicit import batching, convert, decode, generate, pinning, rules, serving
from jax_implicit import model as M
from jax_implicit.sharding import Sharder, make_mesh, RULES

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
INSTRUCTIONS = ["Name three colours.", "What is 2 + 2?", "Write a haiku about rain.", "Hi",
                "Explain photosynthesis to a child in two sentences.", "List the planets.",
                "Translate 'good morning' into French.", "Why is the sky blue?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def setup(tiny_smol_dir):
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    cfg = M.from_hf_config(tiny_smol_dir)
    prompts = serving.encode_all(tok, INSTRUCTIONS, "user_assistant", NEW_TOKENS, cfg.max_position_embeddings)
    ids, mask, seen = batching.pad_prompts(prompts, len(prompts), 16, cfg.pad_token_id)
    tables = rules.build(rules.default_config(), tok, cfg.vocab_size, tok.eos_token_id)
    args = dict(seen_mask=seen, max_new_tokens=NEW_TOKENS, rules=tables, eos_ids=serving.eos_ids_for(cfg, tok))
    tokens, lengths = decode.generate(convert.load_hf(tiny_smol_dir), ids, mask, **args)
    return ids, mask, args, np.asarray(tokens), np.asarray(lengths)


@pytest.mark.parametrize("shape", MESHES)
def test_rules_decoding_on_mesh_equals_one_device(tiny_smol_dir, setup, shape):
    ids, mask, args, want_tokens, want_lengths = setup
    sh = Sharder(make_mesh(dict(zip(("data", "fsdp", "tensor"), shape))), RULES["fsdp_tp"])
    decoder = sh.load_hf(tiny_smol_dir)
    cache = M.KVCache.init(decoder.cfg, ids.shape[0], ids.shape[1] + NEW_TOKENS - 1)
    cache = sh.put(cache, sh.cache(cache))
    assert len(decoder.embed[...].sharding.device_set) == 8
    unstacked = M.unstack(decoder)  # what decoding runs: each layer's weights sharded as the stack is
    assert M.unstack(unstacked) is unstacked and unstacked.embed[...] is decoder.embed[...]
    stacked, own = decoder.layers.w_up[...], unstacked.layers.layers[1]["w_up"][...]
    np.testing.assert_array_equal(np.asarray(own), np.asarray(stacked[1]))
    assert own.sharding.shard_shape(own.shape) == stacked.sharding.shard_shape(stacked.shape)[1:]
    with pinning.active(sh):
        tokens, lengths = decode.generate(decoder, ids, mask, cache=cache, **args)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_array_equal(np.asarray(lengths), want_lengths)


@pytest.fixture(scope="module")
def generate_config(tiny_smol_dir, tmp_path_factory):
    from configs.generate import get_config

    src = tmp_path_factory.mktemp("ins") / "ins.jsonl"
    src.write_text("\n".join(json.dumps({"instruction": i}) for i in INSTRUCTIONS))
    cfg = get_config()
    cfg.model.path = str(tiny_smol_dir)
    cfg.data.instructions = str(src)
    cfg.decode.update(max_new_tokens=NEW_TOKENS, batch_size=8, bucket=16)
    return cfg


@pytest.fixture(scope="module")
def one_device_outputs(generate_config, tmp_path_factory):
    cfg = generate_config.copy_and_resolve_references()
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    cfg.output = str(tmp_path_factory.mktemp("one") / "out.json")
    out = json.loads(generate.run(cfg, devices=jax.devices()[:1]).read_text())
    assert len({r["output"] for r in out}) > 1  # real, differing responses
    return out


@pytest.mark.parametrize("shape,rules", [((8, 1, 1), "fsdp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"),
                                         ((1, 2, 4), "fsdp_tp")])
def test_generate_command_on_mesh_equals_one_device(generate_config, one_device_outputs, tmp_path, shape, rules):
    """The command's own path (config -> weights into shards -> sharded cache -> file) on 8 devices."""
    cfg = generate_config.copy_and_resolve_references()
    cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), shape)), rules=rules)
    cfg.output = str(tmp_path / "out.json")
    assert json.loads(generate.run(cfg).read_text()) == one_device_outputs


def test_generate_command_in_two_processes_equals_one_device(generate_config, one_device_outputs, tmp_path):
    """`python -m jax_implicit.generate` as two jax.distributed processes of 4 CPU devices each on (2, 2, 2):
    global prompt arrays split by rows, every process gathers the tokens, process 0 alone writes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    c, out = generate_config, tmp_path / "two.json"
    args = [f"--config.model.path={c.model.path}", f"--config.data.instructions={c.data.instructions}",
            f"--config.decode.max_new_tokens={c.decode.max_new_tokens}", f"--config.decode.batch_size={c.decode.batch_size}",
            f"--config.decode.bucket={c.decode.bucket}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.mesh.rules=fsdp_tp", f"--config.output={out}"]
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "jax_implicit.generate", *args], cwd=Path(__file__).parents[1],
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p, (_, err) in zip(procs, [p.communicate(timeout=600) for p in procs]):
        assert p.returncode == 0, err[-3000:]
    assert json.loads(out.read_text()) == one_device_outputs
