"""Response Tuning's recipe (An, Kim & Kim, arXiv 2410.02465; data/README.md, "Response Tuning protocol"):

    --config=configs/train/rt.py:llama31_8b,response --config.model.path=/path/to/Llama-3.1-8B
    --config=configs/train/rt.py:mistral_7b,instruction --config.model.path=/path/to/Mistral-7B-v0.3
    --config=configs/train/rt.py:gemma2_9b,response,lora --config.model.path=/path/to/gemma-2-9b
    --config=configs/train/rt.py:gemma3_270m_cpu,response      (the real Gemma-3-270M base, minutes on CPU)

Parts: a model; `response` (RT: responses alone, no user turn) or `instruction` (IT); optionally `lora`
(bf16 base, no quantisation) or `int8` instead of the default QLoRA (NF4 with double quantisation).
The settings are RT's: LoRA rank 64, alpha 16, dropout 0.1 on q/k/v/o/gate/up/down; Adam 32-bit
(RT's paged AdamW without weight decay), lr 1e-4 constant, 10 epochs, batch 64 as 8 x 8, gradient
norm clipped at 0.3, max length 2048, seed 0, bf16 compute; LIMA in RT's chat format.
"""

from jax_implicit import train_config

MODELS = {"llama31_8b": "meta-llama/Llama-3.1-8B", "gemma2_9b": "google/gemma-2-9b",
          "mistral_7b": "mistralai/Mistral-7B-v0.3", "gemma3_270m_cpu": "checkpoints/gemma-3-270m"}
TUNING = ("response", "instruction")
STORAGE = ("lora", "int8")  # default: nf4


def get_config(spec: str = "llama31_8b,response"):
    parts = [p for p in spec.split(",") if p]
    models, tuning = [p for p in parts if p in MODELS], [p for p in parts if p in TUNING]
    storage = [p for p in parts if p in STORAGE]
    unknown = [p for p in parts if p not in (*MODELS, *TUNING, *STORAGE)]
    if unknown or len(models) != 1 or len(tuning) != 1 or len(storage) > 1:
        raise ValueError(f"config string {spec!r}: needs one model {tuple(MODELS)}, one of {TUNING}, and at most "
                         f"one of {STORAGE}" + (f"; not understood: {unknown}" if unknown else ""))
    (model,), (mode,) = models, tuning
    quant = {"lora": "none", "int8": "int8"}.get(storage[0] if storage else "", "nf4")

    cfg = train_config.default_config()
    cfg.model.update(path=MODELS[model], param_dtype="bfloat16", dtype="bfloat16")
    cfg.data.update(name="lima", path="data/lima/lima_data.jsonl", mode=mode, chat_format="rt", max_seq_length=2048,
                    bucket_min=256)
    cfg.lora.update(rank=64, alpha=16.0, dropout=0.1, quant=quant)
    cfg.optim.update(lr=1e-4, schedule="constant", warmup_ratio=0.0, clip_norm=0.3)
    cfg.train.update(epochs=10, global_batch=64, micro_batch=8, seed=0, checkpoint_every=50, max_to_keep=2,
                     out_dir="checkpoints/runs/rt-" + "-".join(parts))
    if model == "gemma3_270m_cpu":  # a slice of LIMA, short rows, a few steps: minutes on two CPU cores
        cfg.model.update(param_dtype="float32", dtype="float32")
        cfg.data.update(limit=32, max_seq_length=128, bucket_min=128)
        cfg.train.update(epochs=1, global_batch=8, micro_batch=4, checkpoint_every=2)
    return cfg
