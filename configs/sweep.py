"""The paper's full sweep for one base model (`python -m jax_implicit.sweep`, see its docstring):

    python -m jax_implicit.sweep --config=configs/sweep.py:llama2_7b --config.launcher=gpu_host
    python -m jax_implicit.sweep --config=configs/sweep.py:olmo_7b --config.launcher=tpu_pod \
        --config.launcher_args="--name=my-v4-32 --zone=us-central2-b" --config.dry_run=True

Defaults are the paper's grid: every tuning task, every epoch count and five seeds, each model
compared with the instruction-tuned model of the same seed. Narrow it with overrides such as
--config.tasks="('instruction','response')" --config.epochs="(10,)" --config.seeds="(1,2,3)".
"""

from ml_collections import ConfigDict

# paper model name (configs/train/paper.py) -> its folder in the results layout
BASES = {"llama2_7b": "llama2-7b", "olmo_7b": "olmo-7b"}
INFERENCE = "--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16 --config.mesh.data=1 --config.mesh.fsdp=-1"


def get_config(model: str = "llama2_7b") -> ConfigDict:
    if model not in BASES:
        raise ValueError(f"unknown sweep model {model!r}; expected one of {sorted(BASES)}")
    c = ConfigDict()
    c.model = model
    c.model_path = ""  # "": the paper's hub id; or a local HF folder of the same model
    c.base = BASES[model]  # results/<base>/...
    c.tasks = ("instruction", "response", "gsm8k", "mbpp", "poetry", "recipes", "chess")
    c.epochs = (5, 7, 10, 15, 20)
    c.seeds = (1, 2, 3, 4, 5)
    c.reference_epochs = 10  # the instruction-tuned model every head-to-head is judged against
    c.rules = ("", "no_eos", "no_uniform", "no_diversity")  # the base model x the rules, and one-rule ablations
    c.eval_sets = ("val", "alpaca_eval")  # val (56) to choose epochs, alpaca_eval (805) for the tables
    c.ranking_data = "tatsu-lab/alpaca"  # the paper's (online); offline: "dolly" or a JSON/JSONL file of {instruction, input, output}
    c.judge = "auto"  # gpt4 with OPENAI_API_KEY, else the local judge (configs/eval/alpaca.py)
    c.allow_local_judge = False  # True: judge the grid with the local model when no OPENAI_API_KEY is set
    c.judge_model = ""  # the local judge's HF folder; "": configs/eval/alpaca.py's
    # True: also the refusal evaluation (configs/eval/safety.py; its judge via extra.safety) of every tuned model,
    # the base model and the base model x rules
    c.safety = False
    c.launcher = "gpu_host"  # gpu_host, tpu_pod or slurm (launch/); evaluation runs as one process on it
    c.target = ""  # accelerator for the chip-hours estimate (jax_implicit.plan.HARDWARE); "": by launcher
    c.launcher_args = ""  # the launcher's own options, e.g. "--name=my-v4-32 --zone=us-central2-b"
    c.setup = False  # True: the first step installs the project on the launcher's machines
    c.runs = "checkpoints/runs"  # training runs (orbax checkpoints + HF export)
    c.results = "results"  # what `python -m jax_implicit.evaluate.tables` reads
    # extra `--config.a.b=v` overrides per command, e.g. generate="--config.decode.batch_size=64"
    # 7B inference: bfloat16 weights, sharded over the launcher's whole mesh (FSDP), like training
    c.extra = ConfigDict(dict(train="", generate=INFERENCE, alpaca="", ranking=INFERENCE + " --config.sharded=True",
                              safety=""))
    c.dry_run = False  # True: print the commands, run nothing
    return c
