"""How close two float32 computations of the same values must be when only the order of their sums differs.

Sharding a matmul, an all-reduce or a different XLA fusion changes only the order in which float32 terms are
added. That changes a sum of K terms by a few ulps times sqrt(K) in practice (K * eps * sum|terms| at worst),
so the tolerance is relative to the tensor's largest magnitude: 2e-5 of it, about 170 float32 ulps there.
Seen under load: 1.1e-5 absolute on logits of magnitude ~5 (2e-6 relative), well inside. A real bug (a shard
in the wrong place, a missing all-reduce, a dropped shard) moves values by about their own size, far outside;
`test_sharding.py` checks that such a change fails this comparison.

Parameters after Adam steps need `slack` on top: Adam divides each gradient element by its own running
magnitude, so reduction-order noise in a gradient element near zero moves that element's update by a
fraction of the learning rate. The sharded-training tests allow 1% of lr per step there; a real bug moves
most elements by about lr per step.
"""

import numpy as np

REORDER = 2e-5


def assert_reorder_close(got, want, slack: float = 0.0, err_msg: str = "") -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=REORDER * float(np.abs(want).max()) + slack, err_msg=err_msg)
