"""Memory-planner configs: `--config=configs/plan.py:llama2_7b` or `:olmo_7b` (paper's models and lengths).

The same keys as a training config (model, mesh, data.max_seq_length, train.micro_batch), so a
training config can be planned directly; plus the accelerator (`hardware`: a name in
`jax_implicit.plan.HARDWARE` or "all") and the share of device memory a plan may use.
"""

from ml_collections import ConfigDict

from jax_implicit import config

MODELS = {"llama2_7b": "meta-llama/Llama-2-7b-hf", "olmo_7b": "allenai/OLMo-7B-hf"}


def get_config(model: str = "llama2_7b") -> ConfigDict:
    if model not in MODELS:
        raise ValueError(f"configs/plan.py:{model}: expected one of {sorted(MODELS)}")
    return ConfigDict(dict(
        model=config.model(MODELS[model], param_dtype="float32", dtype="bfloat16"),
        mesh=config.mesh(data=1, fsdp=-1, tensor=1, rules="fsdp"),
        data=dict(max_seq_length=2048),
        train=dict(micro_batch=8),
        hardware="all",  # a name in jax_implicit.plan.HARDWARE, or "all"
        headroom=0.9,  # share of device memory a plan may use
    ))
