"""Sparse gradients: what merging the duplicate indices of the all-reduced Embedding gradients
(`keras_compat` fix `gradients_reduced_before_apply`) costs per step on keras-io's "Text
classification with Transformer" model, 2 workers, Adam, generated data, against the same
clusters without the fix; and the bytes each worker sends for the embedding gradients (the
all-gather of `IndexedSlices`) against a dense all-reduce of the same tables.

Two estimates of the cost, because this machine's load moves step times by tens of
percent between clusters: (1) fixed against stock clusters, interleaved round by round,
the median of per-round ratios; (2) in the fixed clusters, the merge itself (`unique` and
`unsorted_segment_sum` on slices shaped like the all-gathered ones) timed in the same
process alternately with whole training epochs, the median of per-round shares of a step
(load slows both halves of a round alike).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Goal, Row, Stat, ratio_row
from benchmarks.settings import Settings
from benchmarks.timing import epoch_seconds, median_ms
from launch import local as launch_local
from workloads.text_classification import EMBED_DIM, MAXLEN, VOCAB, text_data, text_transformer

FIX = "gradients_reduced_before_apply"
GLOBAL_BATCH = 32
GOAL = Goal(1.03)


MERGE_CALLS = 50
"""Timed merges per round of the in-process estimate (after a warm-up)."""


def worker(epochs: int, steps: int, fixed: bool) -> dict[str, Any]:
    """The model's median epoch time on this cluster, with or without the fix; with it,
    also `epochs` rounds of one timed epoch and the timed merge of one step's slices."""
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
    result: dict[str, Any] = {
        "epoch_s": statistics.median(epoch_seconds(keras, model, dataset, epochs))}
    if fixed:
        merge = merge_of_one_step(tf, x)
        result["merge_shares"] = []
        for _ in range(epochs):
            started = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0)
            step_ms = (time.perf_counter() - started) * 1000 / steps
            result["merge_shares"].append(median_ms(merge, MERGE_CALLS) / step_ms)
    return result


def merge_of_one_step(tf, x, workers: int = 2):
    """A traced call merging the duplicate indices of one step's all-gathered embedding
    gradients as the fix does: the token ids of a global batch of `x`, and the
    positions once per worker, with float32 rows of the embedding width."""
    from disttrain.keras_compat.gradients_reduced_before_apply import merge_duplicate_indices

    tokens = tf.constant(x[:GLOBAL_BATCH].reshape(-1), tf.int64)
    positions = tf.tile(tf.range(MAXLEN, dtype=tf.int64), [workers])
    gradients = [tf.IndexedSlices(tf.random.normal([int(ids.shape[0]), EMBED_DIM]), ids,
                                  tf.constant([rows, EMBED_DIM], tf.int64))
                 for ids, rows in ((tokens, VOCAB), (positions, MAXLEN))]

    @tf.function
    def merge():
        return [merge_duplicate_indices(g).values for g in gradients]

    return lambda: [v.numpy() for v in merge()]


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
    shares = Stat.of([share for r in measured["fixed"] for share in r["merge_shares"]])
    return [
        ratio_row(f"train step, keras-io text Transformer (vocab {VOCAB}, maxlen {MAXLEN}), "
                  f"Adam, batch {GLOBAL_BATCH}, {workers} workers: sparse gradients reduced "
                  "and merged before apply", step_ms(measured["fixed"]), "without the fix",
                  step_ms(measured["stock"]), " ms", GOAL),
        Row("  the merge alone (unique + segment sum on one step's gathered slices), timed "
            "alternately with whole epochs in the fixed workers: its share of a step",
            f"{shares.median * 100:.2f}% "
            f"({shares.low * 100:.2f}-{shares.high * 100:.2f}%)", "-",
            f"{1 + shares.median:.3f}x", GOAL.verdict(1 + shares.median)),
        Row(f"  bytes a worker sends per step for the embedding gradients ({workers} workers)",
            f"{sparse / 1e6:.2f} MB sparse", f"dense all-reduce: {dense / 1e6:.2f} MB",
            f"{sparse / dense:.2f}x", "-"),
    ]
