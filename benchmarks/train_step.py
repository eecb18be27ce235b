"""Train step time: Keras 3 + disttrain on 2-worker MWMS vs one process and vs tf_keras.

The model is a 3-layer 512-wide MLP on 784 features, 10 classes, Adam, global batch
256, synthetic data; every side trains the same model on the same data with the
same global batch. A cluster times `epochs` epochs after an untimed warm-up epoch
and reports the median epoch. The disttrain cluster also measures, in the same
processes, the collectives a step is made of, where the step's time goes
(`benchmarks.anatomy`), votes (`benchmarks.vote`) and the BatchNormalization sync
(`benchmarks.batchnorm`).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from benchmarks import anatomy, batchnorm, collectives, vote
from benchmarks.cluster import TF_KERAS_ENV, TF_KERAS_MISSING, has_tf_keras, on_cluster
from benchmarks.report import Goal, Row, Stat, ratio_row
from benchmarks.settings import Settings
from benchmarks.timing import epoch_seconds
from launch import local as launch_local

GLOBAL_BATCH = 256
PERSISTENT_ITERATOR = "persistent_epoch_iterator"
FEATURES = 784
WIDTH = 512


def data(steps: int):
    """The same synthetic dataset (global batches) on every worker and every side."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * steps, FEATURES)).astype("float32")
    y = rng.integers(0, 10, size=(GLOBAL_BATCH * steps,)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).prefetch(2)


def mlp(keras, batchnorm_layers: bool = False, steps_per_execution: int = 1):
    """The benchmark model, compiled; `keras` is Keras 3 or tf_keras."""
    layers = [keras.Input((FEATURES,))]
    for _ in range(3):
        layers.append(keras.layers.Dense(WIDTH))
        if batchnorm_layers:
            layers.append(keras.layers.BatchNormalization())
        layers.append(keras.layers.Activation("relu"))
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model


def keras3_worker(epochs: int, steps: int, calls: int, extras: bool,
                  skip_fixes: tuple[str, ...] = (),
                  gradient_compression: str = "none") -> dict[str, Any]:
    """Keras 3 through `disttrain.strategy(gradient_compression=...)` (one process: the
    default strategy), without the `keras_compat` fixes named in `skip_fixes`."""
    import keras

    import disttrain
    from disttrain import keras_compat

    keras_compat.apply(skip=tuple(skip_fixes))
    strategy = disttrain.strategy(gradient_compression=gradient_compression)
    with strategy.scope():
        model = mlp(keras)
    dataset = data(steps)
    result: dict[str, Any] = {"epoch_s": statistics.median(
        epoch_seconds(keras, model, dataset, epochs))}
    if extras:
        result.update(collectives.all_reduce_costs(strategy, model.trainable_variables,
                                                   scalars=2, calls=calls))
        result.update(vote.in_process(keras, model, dataset, epochs, calls))
        result.update(batchnorm.in_process(keras, strategy, dataset, epochs, mlp))
        result.update(anatomy.in_process(keras, strategy, model, dataset, mlp, epochs, steps,
                                         calls))
    return result


def independent_worker(epochs: int, steps: int, workers: int) -> dict[str, Any]:
    """One of `workers` processes that each train the model alone on 1/`workers` of the
    global batch at the same time, without a strategy: the compute of a multi-worker
    step on these cores, with no communication."""
    import keras

    batch = GLOBAL_BATCH // workers
    dataset = data(steps).unbatch().batch(batch).take(steps)
    return {"epoch_s": statistics.median(epoch_seconds(keras, mlp(keras), dataset, epochs))}


def tf_keras_worker(epochs: int, steps: int) -> dict[str, Any]:
    """tf_keras (Keras 2) on a plain `MultiWorkerMirroredStrategy`, unpatched."""
    import json

    import tensorflow as tf

    keras = tf.keras
    workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if len(workers) > 1
                else tf.distribute.get_strategy())
    with strategy.scope():
        model = mlp(keras)
    return {"epoch_s": statistics.median(epoch_seconds(keras, model, data(steps), epochs))}


def measure(settings: Settings, workers: int = 2) -> dict[str, list]:
    """Interleaved rounds: one process, disttrain on `workers`, `workers` independent
    processes (compute alone), tf_keras on `workers`, each of these three again with
    the thread pools `launch.local` gives each task by default, disttrain with Keras's
    own per-epoch input iterators, and disttrain on the other worker counts of
    `settings.scaling_workers`."""
    base = {"epochs": settings.epochs, "steps": settings.steps}
    capped = launch_local.thread_env(launch_local.threads_per_task(workers))
    sides = {
        "single": lambda: on_cluster(keras3_worker, 1, {**base, "calls": 0, "extras": False}),
        "disttrain": lambda: on_cluster(
            keras3_worker, workers, {**base, "calls": settings.collective_calls, "extras": True}),
        "independent": lambda: on_cluster(independent_worker, workers,
                                          {**base, "workers": workers}),
        "capped": lambda: on_cluster(keras3_worker, workers,
                                     {**base, "calls": 0, "extras": False}, env=capped),
        "keras_iterators": lambda: on_cluster(
            keras3_worker, workers, {**base, "calls": 0, "extras": False,
                                     "skip_fixes": [PERSISTENT_ITERATOR]}),
        "independent_capped": lambda: on_cluster(independent_worker, workers,
                                                 {**base, "workers": workers}, env=capped),
    }
    if has_tf_keras():
        sides["tf_keras"] = lambda: on_cluster(tf_keras_worker, workers, base, env=TF_KERAS_ENV)
        sides["tf_keras_capped"] = lambda: on_cluster(tf_keras_worker, workers, base,
                                                      env={**TF_KERAS_ENV, **capped})
    for n in settings.scaling_workers:
        if n not in (1, workers):
            sides[f"disttrain_{n}"] = lambda n=n: on_cluster(
                keras3_worker, n, {**base, "calls": 0, "extras": False})
    measured: dict[str, list] = {name: [] for name in sides}
    order = list(sides)
    for round_ in range(settings.rounds):
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            measured[name].append(sides[name]()[0])
    return measured


def step_ms(result: dict[str, Any], steps: int) -> float:
    return result["epoch_s"] / steps * 1000


def rows(measured: dict[str, list], settings: Settings, workers: int = 2) -> list[Row]:
    """The train-step rows: vs one process, vs tf_keras, and what a step's collectives cost."""
    steps = settings.steps
    ours = [step_ms(r, steps) for r in measured["disttrain"]]
    single = [step_ms(r, steps) for r in measured["single"]]
    dist = measured["disttrain"]
    mb = dist[0]["gradient_bytes"] / 1e6
    result = [
        ratio_row(f"train step, MLP 3x{WIDTH}, batch {GLOBAL_BATCH}, {workers} workers",
                  ours, "1 process, same global batch", single, " ms", Goal(1.3)),
        ratio_row(f"train step, {workers} workers", ours, f"tf_keras, {workers} workers",
                  [step_ms(r, steps) for r in measured["tf_keras"]], " ms", Goal(0.8))
        if "tf_keras" in measured else Row(f"train step, {workers} workers",
                                           Stat.of(ours).show(" ms"), TF_KERAS_MISSING),
        ratio_row(f"train step, {workers} workers, {_threads(workers)}",
                  [step_ms(r, steps) for r in measured["capped"]],
                  "1 process, same global batch", single, " ms", Goal(1.3)),
        ratio_row(f"train step, {workers} workers, {_threads(workers)}",
                  [step_ms(r, steps) for r in measured["capped"]],
                  f"tf_keras, {workers} workers, same threads",
                  [step_ms(r, steps) for r in measured["tf_keras_capped"]], " ms", Goal(0.8))
        if "tf_keras_capped" in measured else None,
        ratio_row(f"  one input iterator per fit (keras_compat {PERSISTENT_ITERATOR})",
                  ours, "Keras's new iterators each epoch",
                  [step_ms(r, steps) for r in measured["keras_iterators"]], " ms"),
        Row(f"  of which gradient all-reduce ({mb:.1f} MB, one packed collective)",
            Stat.of([r["gradient_ms"] for r in dist]).show(" ms"),
            f"1-process step: {Stat.of(single).show(' ms')}",
            Stat.of([r["gradient_ms"] / s for r, s in zip(dist, single)]).show("x", 2)),
        ratio_row("  2 scalar metrics per step: 1 packed all-reduce (default)",
                  [r["scalars_packed_ms"] for r in dist], "one all-reduce each (stock)",
                  [r["scalars_separate_ms"] for r in dist], " ms", digits=2),
        ratio_row(f"  compute alone: {workers} processes, batch {GLOBAL_BATCH // workers} each, "
                  "no strategy", [step_ms(r, steps) for r in measured["independent"]],
                  "1 process, same global batch", single, " ms"),
        ratio_row(f"  the same, {_threads(workers)}", [step_ms(r, steps) for r in
                                                       measured["independent_capped"]],
                  "1 process, same global batch", single, " ms"),
        *anatomy.rows(dist, ours),
    ]
    return [row for row in result if row is not None]


def _threads(workers: int) -> str:
    """The thread cap `launch.local` gives each of `workers` tasks here, as a row label."""
    return f"{launch_local.threads_per_task(workers)} thread(s) each (launch.local default)"
