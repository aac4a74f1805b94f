"""Lists the `copy` ops XLA leaves in the compiled decoding program (`decode._generate_jit`, batch 16,
SmolLM2-135M shapes, no weights loaded): a copy of KV-cache size inside the loop is memory traffic per step.

    .venv/bin/python benchmarks/hlo_copies.py [--slots=640] [--batch=16] [--prompt=32]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_MODEL = flags.DEFINE_string("model", str(ROOT / "checkpoints" / "smollm2-135m-instruct"), "HF model directory")
_SLOTS = flags.DEFINE_integer("slots", 640, "KV cache slots")
_BATCH = flags.DEFINE_integer("batch", 16, "rows")
_PROMPT = flags.DEFINE_integer("prompt", 32, "prompt width")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from jax_implicit import decode
    from jax_implicit import model as M

    cfg = M.from_hf_config(_MODEL.value)
    batch, slots, width = _BATCH.value, _SLOTS.value, _PROMPT.value
    cache = jax.eval_shape(lambda: M.KVCache.init(cfg, batch, slots))
    ids, mask = jax.ShapeDtypeStruct((batch, width), jnp.int32), jax.ShapeDtypeStruct((batch, width), bool)
    eos, scalar = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    text = decode._generate_jit.lower(M.abstract(cfg), ids, mask, mask, cache, None, eos, scalar, scalar, None,
                                      max_new_tokens=slots - width + 1).compile().as_text()
    copies = [line.strip() for line in text.splitlines() if re.search(r"= \S+ copy\(", line)]
    print(f"cache k {cache.k.shape} ({cache.k.size * cache.k.dtype.itemsize / 1e6:.1f} MB); {len(copies)} copy ops:")
    for line in copies:
        print("  " + line[:200])


if __name__ == "__main__":
    app.run(main)
