"""Every finetuning run of the paper, named by a config string:

    --config=configs/train/paper.py:llama2_7b,response,10,seed3
    --config=configs/train/paper.py:olmo_7b,gsm8k,seed2
    --config=configs/train/paper.py:llama2_7b,response,7,ab          (the <|A|>/<|B|> tag ablation)
    --config=configs/train/paper.py:llama2_7b,response,7,rephrased   (responses rewritten not to restate the instruction)

Parts, comma-separated: a model (llama2_7b, olmo_7b); what to train on: instruction or response (LIMA),
or one of the single-task datasets (gsm8k, mbpp, poetry, recipes, chess); epochs (5, 7, 10, 15, 20;
default 10); seed1..seed5 (default seed1); and the flags `ab`, `rephrased`, `authors_schedule`
(the authors' scripts' warmup 0.03 with linear decay instead of the paper's warmup 0.1 with cosine).
Hyperparameters are the paper's: Adam, batch 64, max length 2048, lr 1e-5 (Llama-2-7B) or 3e-6 (OLMo-7B).
Memory: FSDP over every device, float32 master weights with bfloat16 compute, full remat, loss in 512-token
chunks; micro-batch 8 is one row per device on 8 devices (use 16 on a v5e-16).
"""

from jax_implicit import train_config

MODELS = {"llama2_7b": ("meta-llama/Llama-2-7b-hf", 1e-5), "olmo_7b": ("allenai/OLMo-7B-hf", 3e-6)}
LIMA_MODES = ("instruction", "response")
SINGLE_TASK = ("gsm8k", "mbpp", "poetry", "recipes", "chess")
EPOCHS = (5, 7, 10, 15, 20)
SEEDS = tuple(f"seed{i}" for i in range(1, 6))
FLAGS = ("ab", "rephrased", "authors_schedule")


def get_config(spec: str = "llama2_7b,response,10,seed1"):
    parts = [p for p in spec.split(",") if p]
    known = (*MODELS, *LIMA_MODES, *SINGLE_TASK, *map(str, EPOCHS), *SEEDS, *FLAGS)
    unknown = [p for p in parts if p not in known]
    models = [p for p in parts if p in MODELS]
    tasks = [p for p in parts if p in LIMA_MODES + SINGLE_TASK]
    if unknown or len(models) != 1 or len(tasks) != 1:
        raise ValueError(f"config string {spec!r}: needs one model {tuple(MODELS)} and one of "
                         f"{LIMA_MODES + SINGLE_TASK}; optional epochs {EPOCHS}, {SEEDS[0]}..{SEEDS[-1]}, {FLAGS}"
                         + (f"; not understood: {unknown}" if unknown else ""))
    (model,), (task,) = models, tasks
    if "rephrased" in parts and task not in LIMA_MODES:
        raise ValueError(f"config string {spec!r}: 'rephrased' is a LIMA ablation (use it with {LIMA_MODES})")
    epochs = next((int(p) for p in parts if p.isdigit()), 10)
    seed = next((int(p[4:]) for p in parts if p in SEEDS), 1)
    path, lr = MODELS[model]

    cfg = train_config.default_config()
    # float32 masters and Adam moments, bfloat16 compute; remat of every layer and a chunked loss: with FSDP over
    # the whole slice this fits 8 x 80 GB GPUs, TPU v5p-8 and v5e-16 (compiled: jax_implicit.aot; README)
    cfg.model.update(path=path, param_dtype="float32", dtype="bfloat16", remat="full", loss_chunk=512)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, rules="fsdp")
    if task in LIMA_MODES:
        cfg.data.update(name="lima", mode=task, path="lima_rephrased" if "rephrased" in parts else "")
    else:
        cfg.data.update(name=task, mode="single_task")
    cfg.data.update(tag_set="AB" if "ab" in parts else "user_assistant", max_seq_length=2048, bucket_min=256)
    cfg.optim.update(lr=lr, schedule="cosine", warmup_ratio=0.1)
    if "authors_schedule" in parts:
        cfg.optim.update(schedule="linear", warmup_ratio=0.03)
    cfg.train.update(epochs=epochs, global_batch=64, micro_batch=8, seed=seed, reduction="example",
                     checkpoint_every=50, max_to_keep=2, out_dir="checkpoints/runs/" + "-".join(
                         [model, task, f"{epochs}ep", f"seed{seed}", *[p for p in parts if p in FLAGS]]))
    return cfg
