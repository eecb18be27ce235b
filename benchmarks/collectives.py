"""In-process microbenchmarks of MWMS collectives (run inside a worker of a cluster)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.timing import median_ms


def all_reduce_costs(strategy, variables: list, scalars: int, calls: int) -> dict[str, float]:
    """Milliseconds per compiled all-reduce: the gradients of `variables` (one packed
    collective, as the Keras 3 optimizer does), `scalars` scalars one collective each
    (stock Keras 3 per-metric reduction) and the same scalars packed into one.
    """
    import numpy as np
    import tensorflow as tf

    shapes = [tuple(v.shape) for v in variables]

    def replica_all_reduce(make: Callable[[], list]) -> Callable[[], Any]:
        @tf.function
        def run():
            return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                "SUM", make()))

        return lambda: tf.nest.map_structure(lambda t: t.numpy(), run())

    def one_by_one() -> Callable[[], Any]:
        @tf.function
        def run():
            def step():
                context = tf.distribute.get_replica_context()
                return [context.all_reduce("SUM", tf.constant(float(i))) for i in range(scalars)]

            return strategy.run(step)

        return lambda: tf.nest.map_structure(lambda t: t.numpy(), run())

    gradients = replica_all_reduce(lambda: [tf.zeros(s) for s in shapes])
    packed = replica_all_reduce(lambda: [tf.stack([float(i) for i in range(scalars)])])
    return {
        "gradient_bytes": sum(int(np.prod(s)) * np.dtype(v.dtype).itemsize
                              for s, v in zip(shapes, variables)),
        "gradient_ms": median_ms(gradients, calls),
        "scalars_separate_ms": median_ms(one_by_one(), calls),
        "scalars_packed_ms": median_ms(packed, calls),
    }
