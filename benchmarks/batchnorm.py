"""The cost of keeping BatchNormalization statistics identical on every worker."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.report import Row, Stat
from benchmarks.timing import epoch_seconds, median_ms


def in_process(keras, strategy, dataset, epochs: int, build: Callable[..., Any]) -> dict[str, Any]:
    """Runs in every worker: epoch time of the MLP with BatchNormalization after each
    hidden layer, and the time of the sync disttrain runs once per epoch (a barrier
    and one all-reduce of every moving statistic).
    """
    from disttrain import keras_compat

    with strategy.scope():
        model = build(keras, batchnorm_layers=True)
    epoch = statistics.median(epoch_seconds(keras, model, dataset, epochs))
    sync = median_ms(lambda: keras_compat.sync_batchnorm_statistics(model), 20)
    return {"bn_epoch_ms": epoch * 1000, "bn_sync_ms": sync}


def rows(results: list[dict[str, Any]]) -> list[Row]:
    sync = Stat.of([r["bn_sync_ms"] for r in results])
    epoch = Stat.of([r["bn_epoch_ms"] for r in results])
    share = Stat.of([100 * r["bn_sync_ms"] / r["bn_epoch_ms"] for r in results])
    return [Row("BatchNormalization statistics synced (once per epoch)", sync.show(" ms", 2),
                f"epoch of the MLP with 3 BN layers: {epoch.show(' ms', 0)}",
                f"{share.show('%', 2)} of epoch")]
