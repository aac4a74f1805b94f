"""Lists the `copy` ops XLA leaves in the compiled decoding program (`decode._generate_jit`, batch 16,
SmolLM2-135M shapes, no weights loaded): a copy of KV-cache size inside the loop is memory traffic per step.

    .venv/bin/python -m benchmarks.hlo_copies [--config.slots=640] [--config.batch=16] [--config.prompt=32]
"""

from __future__ import annotations

import re

from ml_collections import ConfigDict

from jax_implicit import cli


def run(args: ConfigDict) -> None:
    import jax
    import jax.numpy as jnp

    from jax_implicit import decode
    from jax_implicit import model as M

    cfg = M.from_hf_config(args.model)
    batch, slots, width = args.batch, args.slots, args.prompt
    cache = jax.eval_shape(lambda: M.KVCache.init(cfg, batch, slots))
    ids, mask = jax.ShapeDtypeStruct((batch, width), jnp.int32), jax.ShapeDtypeStruct((batch, width), bool)
    eos, scalar = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    decoder = M.abstract(cfg, unstacked=True)  # as decoding holds it
    text = decode._generate_jit.lower(decoder, ids, mask, mask, cache, None, eos, scalar, scalar, None,
                                      max_new_tokens=slots - width + 1).compile().as_text()
    copies = [line.strip() for line in text.splitlines() if re.search(r"= \S+ copy\(", line)]
    print(f"cache k {len(cache.k)} x {cache.k[0].shape} ({cache.k[0].size * cache.k[0].dtype.itemsize / 1e6:.1f} MB "
          f"a layer); {len(copies)} copy ops:")
    for line in copies:
        print("  " + line[:200])


if __name__ == "__main__":
    cli.main(run, "configs/bench/hlo_copies.py")
