"""Response or instruction tuning of SmolLM2-135M on a slice of LIMA, sized to finish in minutes on 2 CPU cores.

    python -m jax_implicit.train --config=configs/train/smollm2_cpu.py:response
    python -m jax_implicit.train --config=configs/train/smollm2_cpu.py:instruction --config.train.epochs=2

LIMA is read from the copy shipped in data/lima (the default source of the dataset name `lima`).
"""

from jax_implicit import train_config


def get_config(mode: str = "response"):
    cfg = train_config.default_config()
    cfg.data.update(name="lima", mode=mode, max_seq_length=128,
                    limit=128, bucket_min=64)
    cfg.optim.update(lr=3e-5, schedule="cosine", warmup_ratio=0.1)
    cfg.train.update(epochs=1, global_batch=16, micro_batch=4, seed=1, checkpoint_every=8, max_to_keep=2,
                     out_dir=f"checkpoints/runs/smollm2_cpu-{mode}")
    return cfg
