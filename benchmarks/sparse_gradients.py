"""Sparse gradients: what merging the duplicate indices of the all-reduced Embedding gradients
(`keras_compat` fix `gradients_reduced_before_apply`) costs per step on keras-io's "Text
classification with Transformer" model, 2 workers, Adam, generated data, against the same
clusters without the fix; and the bytes each worker sends for the embedding gradients (the
all-gather of `IndexedSlices`) against a dense all-reduce of the same tables.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Goal, Row, ratio_row
from benchmarks.settings import Settings
from benchmarks.timing import epoch_seconds
from launch import local as launch_local
from workloads.text_classification import EMBED_DIM, MAXLEN, VOCAB, text_data, text_transformer

FIX = "gradients_reduced_before_apply"
GLOBAL_BATCH = 32
GOAL = Goal(1.03)


def worker(epochs: int, steps: int, fixed: bool) -> dict[str, Any]:
    """The model's median epoch time on this cluster, with or without the fix."""
    import keras
    import tensorflow as tf

    import disttrain
    from disttrain import keras_compat

    keras_compat.apply(skip=() if fixed else (FIX,))
    with disttrain.strategy().scope():
        keras.utils.set_random_seed(1)
        model = text_transformer()
    x, y = text_data(GLOBAL_BATCH * steps)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    return {"epoch_s": statistics.median(epoch_seconds(keras, model, dataset, epochs))}


def measure(settings: Settings, workers: int = 2) -> dict[str, Any]:
    """Interleaved rounds with and without the fix, `launch.local`'s thread caps."""
    kwargs = {"epochs": settings.epochs, "steps": settings.steps}
    env = launch_local.thread_env(launch_local.threads_per_task(workers))
    measured: dict[str, list] = {"fixed": [], "stock": []}
    for round_ in range(settings.rounds):
        for name in (["fixed", "stock"] if round_ % 2 == 0 else ["stock", "fixed"]):
            measured[name] += on_cluster(worker, workers, {**kwargs, "fixed": name == "fixed"},
                                         env=env)[:1]
    return measured


def sent_bytes(workers: int = 2) -> tuple[int, int]:
    """(sparse, dense): bytes one worker sends per step for the token and position
    embedding gradients: its `IndexedSlices` (float32 rows, int64 indices) in the
    all-gather, against float32 tables in a ring all-reduce (2 (N-1)/N of the table)."""
    rows = GLOBAL_BATCH // workers * MAXLEN + MAXLEN
    sparse = rows * (EMBED_DIM * 4 + 8)
    dense = int((VOCAB + MAXLEN) * EMBED_DIM * 4 * 2 * (workers - 1) / workers)
    return sparse, dense


def rows(measured: dict[str, Any], settings: Settings, workers: int = 2) -> list[Row]:
    def step_ms(results: list[dict[str, Any]]) -> list[float]:
        return [r["epoch_s"] / settings.steps * 1000 for r in results]

    sparse, dense = sent_bytes(workers)
    return [
        ratio_row(f"train step, keras-io text Transformer (vocab {VOCAB}, maxlen {MAXLEN}), "
                  f"Adam, batch {GLOBAL_BATCH}, {workers} workers: sparse gradients reduced "
                  "and merged before apply", step_ms(measured["fixed"]), "without the fix",
                  step_ms(measured["stock"]), " ms", GOAL),
        Row(f"  bytes a worker sends per step for the embedding gradients ({workers} workers)",
            f"{sparse / 1e6:.2f} MB sparse", f"dense all-reduce: {dense / 1e6:.2f} MB",
            f"{sparse / dense:.2f}x", "-"),
    ]
