"""Where a 2-worker train step's time goes, measured inside the disttrain cluster.

The step is rebuilt in layers, each a compiled function run on the same batch
by every worker: the forward and backward pass alone (no communication), plus
the gradient all-reduce, Keras's whole `train_step` (optimizer update, metric
updates), and that step fed from the distributed iterator (of the repeated
dataset, as `fit` uses it through `keras_compat`'s persistent iterator: no
all-reduce on whether every worker still has data). Then the same
model trains under `fit` with `compile(steps_per_execution=8)` (fixed by
`keras_compat`: eight steps per call, one log reduction per call) to show what
host round trips cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.report import Row, Stat
from benchmarks.timing import epoch_seconds, median_ms

STEPS_PER_EXECUTION = 8

LAYERS = (
    ("forward_backward_ms", "forward + backward only, no communication"),
    ("with_gradient_all_reduce_ms", "+ gradient all-reduce"),
    ("keras_train_step_ms", "Keras train_step (+ optimizer and metric updates)"),
    ("from_distributed_input_ms", "+ batch from the distributed iterator"),
)


def in_process(keras, strategy, model, dataset, make_model: Callable, epochs: int,
               steps: int, calls: int) -> dict[str, Any]:
    """Runs in every worker of a disttrain cluster; returns milliseconds per layer and
    the fit step with `steps_per_execution`."""
    import tensorflow as tf

    loss = model.loss
    variables = model.trainable_variables
    distributed = strategy.experimental_distribute_dataset(dataset.repeat())
    batches = iter(distributed)
    x, y = next(batches)

    def gradients(features, labels):
        with tf.GradientTape() as tape:
            value = loss(labels, model(features, training=True))
        return tape.gradient(value, variables)

    def replica_fn(reduce: bool):
        def step(features, labels):
            grads = gradients(features, labels)
            if reduce:
                grads = tf.distribute.get_replica_context().all_reduce("SUM", grads)
            return tf.add_n([tf.reduce_sum(g) for g in grads])
        return step

    def compiled(replica, *args) -> Callable[[], Any]:
        function = tf.function(lambda *a: strategy.run(replica, args=a))
        return lambda: strategy.experimental_local_results(function(*args))[0].numpy()

    train_step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)))

    def from_iterator():
        logs = train_step(next(batches))
        return strategy.experimental_local_results(logs["loss"])[0].numpy()

    result = {
        "forward_backward_ms": median_ms(compiled(replica_fn(False), x, y), calls),
        "with_gradient_all_reduce_ms": median_ms(compiled(replica_fn(True), x, y), calls),
        "keras_train_step_ms": median_ms(
            lambda: strategy.experimental_local_results(train_step((x, y))["loss"])[0].numpy(),
            calls),
        "from_distributed_input_ms": median_ms(from_iterator, calls),
    }
    with strategy.scope():
        multi = make_model(keras, steps_per_execution=STEPS_PER_EXECUTION)
    result["steps_per_execution_ms"] = statistics.median(
        epoch_seconds(keras, multi, dataset, epochs)) / steps * 1000
    return result


def rows(dist: list[dict[str, Any]], step_ms: list[float]) -> list[Row]:
    """The anatomy rows: each layer against the whole fit step of the same cluster."""
    result = [Row(f"  {label}", Stat.of([r[key] for r in dist]).show(" ms"),
                  f"fit step: {Stat.of(step_ms).show(' ms')}",
                  Stat.of([r[key] / s for r, s in zip(dist, step_ms)]).show("x", 2))
              for key, label in LAYERS]
    ours = [r["steps_per_execution_ms"] for r in dist]
    result.append(Row(
        f"  fit with compile(steps_per_execution={STEPS_PER_EXECUTION})",
        Stat.of(ours).show(" ms"), f"steps_per_execution=1: {Stat.of(step_ms).show(' ms')}",
        Stat.of([a / b for a, b in zip(ours, step_ms)]).show("x", 2)))
    return result
