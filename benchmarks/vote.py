"""Votes: what agreeing on a decision costs, per call and per epoch."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.report import Goal, Row, Stat
from benchmarks.timing import median_ms


def in_process(keras, model, dataset, epochs: int, calls: int) -> dict[str, Any]:
    """Runs in every worker: vote latency, a compiled all-reduce of a flag, and per epoch
    of a real `fit` what agreeing costs: disttrain's deciding callbacks (ReduceLROnPlateau,
    EarlyStopping without its best-weights copy, SyncStop) minus Keras's own two in a
    `fit` just before (the same decisions taken alone on each worker), plus the one exchange
    that ends each epoch (`keras_compat.stop_agreement`, which carries their votes)."""
    import tensorflow as tf

    from disttrain import callbacks, coordination
    from disttrain.keras_compat import stop_agreement

    coord = coordination.get()
    strategy = model.distribute_strategy

    @tf.function
    def all_reduce_flag(flag):
        return strategy.run(
            lambda f: tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(f)),
            args=(flag,))

    marks: dict[str, list[float]] = {"begin": [], "before": [], "after": [], "exchange": []}

    class Mark(keras.callbacks.Callback):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def on_epoch_begin(self, epoch, logs=None):
            if self.name == "before":
                marks["begin"].append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            marks[self.name].append(time.perf_counter())

    agree = stop_agreement._agree_at_epoch_end

    def timed_agree(end):
        started = time.perf_counter()
        agree(end)
        marks["exchange"].append(time.perf_counter() - started)

    def epoch_ends(deciders: list) -> tuple[list[float], list[float], list[float]]:
        """Per timed epoch of one `fit` (the first is a warm-up): the deciders'
        `on_epoch_end`, the epoch-end exchange and the whole epoch, in ms."""
        for values in marks.values():
            values.clear()
        stop_agreement._agree_at_epoch_end = timed_agree
        try:
            model.fit(dataset, epochs=epochs + 2, verbose=0,
                      callbacks=[Mark("before"), *deciders, Mark("after")])
        finally:
            stop_agreement._agree_at_epoch_end = agree
        return ([(b - a) * 1000 for a, b in zip(marks["before"][1:-1], marks["after"][1:-1])],
                [x * 1000 for x in marks["exchange"][1:-1]],
                [(b - a) * 1000 for a, b in zip(marks["begin"][1:-1], marks["begin"][2:])])

    keras_alone, _, _ = epoch_ends([
        keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=10_000),
        keras.callbacks.EarlyStopping(monitor="loss", patience=10_000)])
    ours, exchange, epoch = epoch_ends([
        callbacks.ReduceLROnPlateau(monitor="loss", patience=10_000),
        callbacks.EarlyStopping(monitor="loss", patience=10_000, restore_best_weights=False),
        callbacks.SyncStop()])
    return {
        "vote_ms": median_ms(lambda: coord.any(False, "bench.vote"), calls),
        "flag_all_reduce_ms": median_ms(lambda: all_reduce_flag(tf.constant(0.0)).numpy(),
                                        calls),
        "decisions_per_epoch_ms": (statistics.median(ours) - statistics.median(keras_alone)
                                   + statistics.median(exchange)),
        "decisions_epoch_ms": statistics.median(epoch),
    }


def rows(results: list[dict[str, Any]], workers: int = 2) -> list[Row]:
    """Per-call latency against the goal, and the per-epoch cost as a share of the epoch."""
    vote = Stat.of([r["vote_ms"] for r in results])
    flag = Stat.of([r["flag_all_reduce_ms"] for r in results])
    per_epoch = Stat.of([r["decisions_per_epoch_ms"] for r in results])
    share = Stat.of([100 * r["decisions_per_epoch_ms"] / r["decisions_epoch_ms"]
                     for r in results])
    epoch = Stat.of([r["decisions_epoch_ms"] for r in results])
    return [
        Row(f"vote, one call, {workers} workers (coordination.any)", vote.show(" ms", 2),
            f"compiled all-reduce of a flag: {flag.show(' ms', 2)}",
            Stat.of([r["vote_ms"] / r["flag_all_reduce_ms"] for r in results]).show("x", 2),
            Goal(2, " ms").verdict(vote.median)),
        Row("votes per epoch (ReduceLROnPlateau, EarlyStopping, SyncStop over Keras's, + one exchange)",
            per_epoch.show(" ms", 2), f"the epoch: {epoch.show(' ms', 0)}",
            f"{share.show('%', 2)} of epoch"),
    ]
