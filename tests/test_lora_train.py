"""LoRA / QLoRA training on the tiny SmolLM2-vocabulary model: only the adapters are trained and held by
the optimizer, gradient clipping applies to them, checkpoints hold only adapters and optimizer state,
a killed QLoRA run resumes bit for bit, and the exports (peft adapter, merged HF folder) agree."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file
from test_model import padded_batch
from test_train import CPU_CONFIG, ONE_DEVICE, ROOT, kill_after_checkpoint, overrides, tiny_config
from transformers import AutoModelForCausalLM

from jax_implicit import cli, convert, lora, train, train_config, train_step

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.quant": "nf4", "optim.schedule": "constant",
        "optim.clip_norm": 0.3, "optim.lr": 3e-2}


@pytest.fixture(scope="module")
def qlora_run(tiny_smol_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    return train.run(tiny_config(tiny_smol_dir, data_dir, out, **LORA), ONE_DEVICE)


def test_qlora_run_trains_only_adapters_and_exports_agree(qlora_run, tiny_smol_dir):
    rows = [json.loads(line) for line in qlora_run.metrics.read_text().splitlines()]
    assert len(rows) == 12 and np.mean([r["loss"] for r in rows[-2:]]) < np.mean([r["loss"] for r in rows[:2]]) - 0.5
    state = qlora_run.state
    names = {f"{n}_lora_{p}" for n in lora.TARGETS.values() for p in "ab"}
    assert set(state["params"]) == {"layers"} and set(state["params"]["layers"]) == names
    moments = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim]  # Adam's mu and nu: adapters only
    assert sorted(moments) == sorted(2 * [x.shape for x in jax.tree.leaves(state["params"])])
    # the checkpoint holds exactly that state: nothing of the base model
    saved = json.loads(next((qlora_run.out_dir / "checkpoints").glob("*/state/_METADATA")).read_text())
    keys = list(saved["tree_metadata"])
    assert sum("_lora_" in k for k in keys) == 3 * len(names)  # params, mu, nu
    frozen = {"embed", "final_norm", "attn_norm", "mlp_norm", *lora.HF_MODULES, *(f"{n}_q_nf4" for n in lora.HF_MODULES)}
    assert not [k for k in keys if any(f"'{n}'" in k for n in frozen)]
    # merged export = the unquantised base weights + scale * B A of the exported peft adapter; the rest untouched
    base, merged = load_file(tiny_smol_dir / "model.safetensors"), load_file(qlora_run.hf_dir / "model.safetensors")
    adapter = load_file(qlora_run.out_dir / "adapter" / "adapter_model.safetensors")
    for name, value in base.items():
        module = name.removeprefix("model.").removesuffix(".weight")
        a = adapter.get(f"base_model.model.model.{module}.lora_A.weight")
        if a is None:
            np.testing.assert_array_equal(merged[name], value, err_msg=name)
        else:
            b = adapter[f"base_model.model.model.{module}.lora_B.weight"]
            assert np.abs(b).max() > 0, name
            np.testing.assert_allclose(merged[name], value + 2.0 * b @ a, atol=1e-6, err_msg=name)
    # the peft adapter on the transformers base gives the merged folder's logits
    from peft import PeftModel

    ids, mask = padded_batch(49152)
    pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    run = lambda m: m(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),  # noqa: E731
                      position_ids=pos).logits.detach().numpy()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32),
                                     qlora_run.out_dir / "adapter").eval()
    ref = run(AutoModelForCausalLM.from_pretrained(qlora_run.hf_dir, dtype=torch.float32))
    assert np.abs(run(peft) - ref)[mask].max() <= 1e-4


def test_killed_qlora_run_resumes_bit_identically(qlora_run, tiny_smol_dir, data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jax_implicit.train", f"--config={CPU_CONFIG}:response"]
    cmd += [f"--config.{k}={v}" for k, v in {**overrides(tiny_smol_dir, data_dir, out), **LORA}.items()]
    env = kill_after_checkpoint(cmd, out)
    assert not (out / "hf").exists(), "the run finished before it was killed"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from step" in done.stderr
    ref, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (qlora_run.out_dir, out))
    assert sorted(ref) == sorted(got) and all(np.array_equal(ref[k], got[k]) for k in ref)
    losses = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(out) == losses(qlora_run.out_dir)


def test_clipping_at_0_3_applies_to_the_adapter_gradients(tiny_hf):
    decoder = lora.apply(convert.load_hf(tiny_hf("llama_mha")), lora.lora_config(rank=2, alpha=4.0))
    graphdef, params, frozen = lora.split(decoder)
    optim = train_config.optim_config(lr=1e-4, schedule="constant", warmup_ratio=0.0, clip_norm=0.3)
    optimizer = train_step.make_optimizer(optim, 10)
    _, apply_step = train_step.build_steps(graphdef, optimizer)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    norm = float(optax.tree.norm(grads))
    state, *_ = apply_step(train_step.init_state(params, optimizer, 0), grads)
    mu = state["opt_state"][1][0].mu  # chain(clip, adam): Adam's first moment after one step is 0.1 * clipped grad
    for m in jax.tree.leaves(mu):
        np.testing.assert_allclose(np.asarray(m), 0.1 * 0.5 * 0.3 / norm, rtol=1e-5)
    assert norm > 0.3 and set(jax.tree.leaves(jax.tree.map(lambda p: p.ndim, frozen)))  # frozen: the rest


def test_rt_configs_hold_the_response_tuning_recipe():
    for model in ("llama31_8b", "gemma2_9b", "mistral_7b", "gemma3_270m_cpu"):
        for mode in ("response", "instruction"):
            for storage, quant in (("", "nf4"), (",lora", "none"), (",int8", "int8")):
                cfg = cli.load(f"{ROOT}/configs/train/rt.py:{model},{mode}{storage}")
                train_config.check_config(cfg)
                assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.quant) == (64, 16.0, 0.1, quant)
                assert set(cfg.lora.targets) == set(lora.TARGETS) and cfg.data.chat_format == "rt"
                assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.clip_norm) == (
                    1e-4, "constant", 0.0, 0.3)
                assert cfg.data.mode == mode and cfg.train.seed == 0
                if model != "gemma3_270m_cpu":
                    assert (cfg.train.epochs, cfg.train.global_batch, cfg.train.micro_batch) == (10, 64, 8)
                    assert cfg.data.max_seq_length == 2048 and cfg.model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="needs one model"):
        cli.load(f"{ROOT}/configs/train/rt.py:llama31_8b,response,lora,int8")
    schedule = train_step.lr_schedule(cfg.optim, 100)
    assert float(schedule(0)) == float(schedule(99)) == pytest.approx(1e-4)


def test_qlora_step_on_a_mesh_shards_adapters_like_their_base_and_equals_one_device(tiny_hf):
    from jax.sharding import PartitionSpec as P

    from jax_implicit.sharding import Sharder

    hf_dir = tiny_hf("llama_mha")
    lcfg = lora.lora_config(rank=4, alpha=8.0, quant="nf4")
    optimizer = train_step.make_optimizer(train_config.optim_config(lr=1e-2, schedule="constant", warmup_ratio=0.0, clip_norm=0.3), 10)
    ids, mask = padded_batch(256, lengths=(12, 9, 5, 12))
    batch = dict(tokens=ids, mask=mask, weights=(mask / mask.sum()).astype(np.float32))

    def one_step(sh):
        cfg = convert.load_hf(hf_dir).cfg
        state_abs, frozen_abs = train_step.abstract_state(cfg, optimizer, 0, sh, lcfg)
        state_sh, frozen_sh = (jax.tree.map(lambda s: s.sharding, a) for a in (state_abs, frozen_abs))
        graphdef, params, frozen = lora.split(lora.apply(convert.load_hf(hf_dir), lcfg))
        params = jax.tree.map(lambda p: p + 0.01, params)  # B non-zero, so the forward depends on it
        state = jax.device_put(train_step.init_state(params, optimizer, 0), state_sh)
        frozen = jax.device_put(frozen, frozen_sh)
        micro, apply = train_step.build_steps(graphdef, optimizer, state_sh, sh.rows(ids.shape), frozen_sh)
        accum, loss = micro(state["params"], train_step.zeros_accum(state["params"]), sh.global_batch(batch, len(ids)), frozen)
        state, *_ = apply(state, accum)
        return state_sh, frozen_sh, float(loss), jax.device_get(state["params"])

    sh = Sharder.from_config(dict(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    state_sh, frozen_sh, loss, params = one_step(sh)
    layers = state_sh["params"]["layers"]
    assert layers["wq_lora_a"].spec == P(None, "fsdp", None) and layers["wq_lora_b"].spec == P(None, None, "tensor", None)
    assert layers["w_down_lora_a"].spec == P(None, "tensor", None) and layers["w_down_lora_b"].spec == P(None, None, "fsdp")
    assert frozen_sh["layers"]["wq_q_nf4"].spec == P(None, "tensor", "fsdp")
    ref_loss, ref_params = one_step(Sharder.from_config(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))[2:]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
