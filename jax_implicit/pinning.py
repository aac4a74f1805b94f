"""Activations pinned to the device mesh by their logical axes, with the mesh and rule table taken from a context.

The model calls `constrain` on its residual stream and its logits, always. Inside `active(sharder)` (a
`sharding.Sharder`: a mesh and a rule table) that pins them: without it XLA may keep FSDP weights split along `embed` and compute every
activation for the whole batch on every device (correct, but neither memory nor compute would shrink with the
mesh). Outside any, `constrain` is the identity: one device, or shardings left to propagate from the inputs.
The context is a `jax.make_user_context`, which is part of jit's cache key: a function traced outside it is
traced again inside it (and under another mesh or rule table), never reused with the wrong pinning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax

ACTIVE = jax.make_user_context(None)  # the `sharding.Sharder` in effect while tracing, or None


def active(sharder: Any | None) -> contextlib.AbstractContextManager:
    """Context manager: while traced inside it, the model pins its residual stream to (batch, seq, -) and its
    logits to (batch, seq, vocab) on `sharder`'s mesh. None (one device, no mesh): no pinning."""
    return contextlib.nullcontext() if sharder is None else ACTIVE(sharder)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the active mesh by its logical `axes`; unchanged outside `active(...)`."""
    sharder = ACTIVE.value
    return x if sharder is None else sharder.constrain(x, axes)
