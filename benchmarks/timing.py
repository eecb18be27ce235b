"""Timing helpers used inside benchmark workers."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(call: Callable[[], Any], calls: int, warmup: int = 3) -> float:
    """Median wall time of `call()` in milliseconds over `calls` calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def epoch_seconds(keras, model, dataset, epochs: int, callbacks: list | None = None) -> list[float]:
    """Wall seconds of each of `epochs` epochs of `model.fit` after one untimed warm-up
    epoch (tracing): the time between successive epoch ends, so the work between
    epochs (iterator creation, metric reads and resets) counts. `keras` is the Keras
    module the model belongs to."""
    ends: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model.fit(dataset, epochs=epochs + 1, verbose=0, callbacks=[Timer(), *(callbacks or [])])
    return [b - a for a, b in itertools.pairwise(ends)]


def bytes_written() -> int:
    """Bytes this process has passed to write(2) and friends so far (`/proc/self/io`
    wchar: file writes, not socket sends)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")
