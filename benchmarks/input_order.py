"""Input order: what drawing one process's shuffled order costs before training (`input_order`).

With a global seed, a multi-worker `fit(x, y, shuffle=True or "batch")` on arrays draws
the epoch's order once from the index stages of Keras's own pipeline and replays it each
pass. Measured in one fresh process per size and shuffle: the extra time Keras's
`get_tf_dataset` takes with the draw (before the first step), the time a new iterator
takes to its first batch (once per epoch) with the replayed order against Keras's own
shuffle, and the process's peak memory growth over the draws (each builds Keras's
pipeline over the sample ids, which holds a TensorFlow copy of them, and the order).
"""

from __future__ import annotations

import resource
import time
from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Goal, Row, Stat
from benchmarks.settings import Settings

BATCH = 32
GOAL = Goal(0.5, " s per million samples")
REPEATS = 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(samples: int, shuffle: bool | str) -> dict[str, Any]:
    """Draw time, peak memory growth of the draw, and first-batch times of new
    iterators, replayed against stock, for `samples` sample ids."""
    import keras
    import numpy as np
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        ArrayDataAdapter,
    )

    from disttrain.keras_compat import input_order

    input_order.install()
    keras.utils.set_random_seed(1)

    def adapter(n: int) -> ArrayDataAdapter:
        return ArrayDataAdapter(np.arange(n, dtype="int64"), batch_size=BATCH, shuffle=shuffle)

    def first_batch_s(dataset) -> float:
        started = time.perf_counter()
        next(iter(dataset))
        return time.perf_counter() - started

    with input_order.agreed(None):  # traces Keras's functions outside the timing
        adapter(BATCH).get_tf_dataset()
    ids = adapter(samples)
    before = _rss_bytes()
    draws = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        with input_order.agreed(None):
            replayed = ids.get_tf_dataset()
        draws.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    builds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        stock = ids.get_tf_dataset()
        builds.append(time.perf_counter() - started)
    return {"draw_s": draws, "build_s": builds, "peak_bytes": peak,
            "replayed_epoch_s": [first_batch_s(replayed) for _ in range(REPEATS)],
            "stock_epoch_s": [first_batch_s(stock) for _ in range(REPEATS)]}


def sizes(settings: Settings) -> tuple[int, ...]:
    """Sample counts measured: 1M and 10M (100k in the smoke run)."""
    return (100_000,) if settings.name == "smoke" else (1_000_000, 10_000_000)


def measure(settings: Settings) -> dict[tuple[int, str], dict[str, Any]]:
    """One fresh process per sample count and shuffle."""
    return {(samples, str(shuffle)): on_cluster(worker, 1, {"samples": samples,
                                                             "shuffle": shuffle})[0]
            for samples in sizes(settings) for shuffle in (True, "batch")}


def rows(measured: dict[tuple[int, str], dict[str, Any]]) -> list[Row]:
    result = []
    for (samples, shuffle), m in measured.items():
        extra = [d - b for d, b in zip(m["draw_s"], m["build_s"])]
        per_million = Stat.of([e / (samples / 1e6) for e in extra])
        result += [
            Row(f"input order: draw one process's order, {samples / 1e6:g}M samples, "
                f"shuffle={shuffle}, batch {BATCH} (time before the first step)",
                Stat.of(extra).show(" s", 2), f"Keras's pipeline build: "
                f"{Stat.of(m['build_s']).show(' s', 3)}",
                f"{per_million.median:.2f} s/M", GOAL.verdict(per_million.median)),
            Row(f"  per epoch: a new iterator's first batch, replayed order vs Keras's "
                f"shuffle; peak memory growth over {REPEATS} draws "
                f"{m['peak_bytes'] / 1e6:.0f} MB (the order: {samples * 8 / 1e6:.0f} MB)",
                Stat.of(m["replayed_epoch_s"]).show(" s", 3),
                Stat.of(m["stock_epoch_s"]).show(" s", 3)),
        ]
    return result
