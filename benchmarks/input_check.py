"""The input check: what comparing the workers' first batches costs before evaluate (and fit).

The input is the benchmark MLP's data behind a seeded shuffle of every sample (the
check's worst ordinary case: its first batch fills the whole shuffle buffer). Each
`evaluate` gets a new dataset object, so the check runs every time (it skips a
dataset object that passed before); calls with the check on and off alternate in
the same 2-worker cluster.

NumPy arrays are hashed whole before every call: the check of `fit(x, y)` is timed
for 100 MB and 1 GB of `x` on each of 2 workers (both hashing at once), with the
memory it allocates meanwhile (a copy of the arrays would show here).

A generator's later batches (`keras_compat.later_batches`): `fit` of the benchmark MLP on
a generator with the check on and off, alternating; the hash of one batch against the
step; the exchange of an epoch's hashes at its end against one exchange per step.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from benchmarks import train_step
from benchmarks.cluster import on_cluster
from benchmarks.report import Goal, Row, Stat, ratio_row
from benchmarks.settings import Settings

WORKERS = 2


def worker(steps: int, calls: int) -> dict[str, Any]:
    """Runs in every worker: `evaluate` with the check on and off, alternating, and
    the check alone (`input_check.check_inputs` on a new dataset object)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import disttrain
    from disttrain.keras_compat import input_check

    strategy = disttrain.strategy()
    with strategy.scope():
        model = train_step.mlp(keras)
    rng = np.random.default_rng(0)
    samples = train_step.GLOBAL_BATCH * steps
    x = tf.constant(rng.normal(size=(samples, train_step.FEATURES)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=(samples,)).astype("int32"))

    def dataset():
        return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(samples, seed=0)
                .batch(train_step.GLOBAL_BATCH).prefetch(2))

    def evaluate_ms(check: bool) -> float:
        os.environ[input_check.ENV_DISABLE] = "1" if check else "0"
        data = dataset()
        start = time.perf_counter()
        model.evaluate(data, verbose=0)
        return (time.perf_counter() - start) * 1000

    on, off = _alternating(evaluate_ms, calls)
    alone = []
    for data in [dataset() for _ in range(calls)]:
        start = time.perf_counter()
        input_check.check_inputs(strategy, {"x": data}, "bench")
        alone.append((time.perf_counter() - start) * 1000)
    return {"on_ms": statistics.median(on), "off_ms": statistics.median(off),
            "check_ms": statistics.median(alone)}


def _alternating(call_ms, calls: int) -> tuple[list[float], list[float]]:
    """`call_ms(check)` once to warm up, then `calls` times with the input checks on and
    off, alternating; the milliseconds of each side. The checks are left on."""
    from disttrain.keras_compat import input_check

    call_ms(True)
    on, off = [], []
    for _ in range(calls):
        on.append(call_ms(True))
        off.append(call_ms(False))
    os.environ[input_check.ENV_DISABLE] = "1"
    return on, off


ARRAY_GOAL = Goal(1.0, " s per GB")


def arrays_worker(megabytes: list[int], calls: int) -> dict[str, Any]:
    """Runs in every worker: the input check of `fit(x, y)` for each size of `x` (float32),
    `calls` times; the seconds of each and the bytes allocated during the first."""
    import tracemalloc

    import numpy as np

    import disttrain
    from disttrain.keras_compat import input_check

    strategy = disttrain.strategy()
    measured: dict[str, Any] = {}
    for size in megabytes:
        x = np.arange(size * (1 << 20) // 4, dtype="float32").reshape(-1, 64)
        y = np.zeros((len(x), 1), dtype="float32")
        seconds, peak = [], 0
        for call in range(calls):
            if call == 0:
                tracemalloc.start()
            start = time.perf_counter()
            input_check.check_inputs(strategy, {"x": x, "y": y}, "bench", shuffle=True)
            seconds.append(time.perf_counter() - start)
            if call == 0:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        measured[str(size)] = {"s": statistics.median(seconds), "peak_bytes": peak,
                               "bytes": x.nbytes + y.nbytes}
        del x, y
    return measured


def later_batches_worker(steps: int, calls: int) -> dict[str, Any]:
    """Runs in every worker: `fit` for `steps` steps on a generator with the input checks
    on and off, alternating; the hash of one batch; the end-of-epoch exchange of `steps`
    hashes, and one exchange of a single step's hash (what a per-step exchange costs)."""
    import keras
    import numpy as np

    import disttrain
    from disttrain.keras_compat import input_check, later_batches
    from disttrain.keras_compat.digest import batch_digest

    strategy = disttrain.strategy()
    with strategy.scope():
        model = train_step.mlp(keras)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(train_step.GLOBAL_BATCH, train_step.FEATURES)).astype("float32"),
                rng.integers(0, 10, size=(train_step.GLOBAL_BATCH,)).astype("int32"))
               for _ in range(steps)]

    def fit_ms(check: bool) -> float:
        os.environ[input_check.ENV_DISABLE] = "1" if check else "0"
        start = time.perf_counter()
        model.fit((b for b in batches), steps_per_epoch=steps, epochs=1, verbose=0)
        return (time.perf_counter() - start) * 1000

    on, off = _alternating(fit_ms, calls)
    digest = []
    for batch in batches:
        start = time.perf_counter()
        batch_digest(batch)
        digest.append((time.perf_counter() - start) * 1000)

    def exchange_ms(count: int) -> float:
        ledger = later_batches.Ledger("x", "generator")
        list(ledger.read(iter(batches[:count]), ends=True))
        start = time.perf_counter()
        later_batches.compare("bench", [ledger], count, 1, 0)
        return (time.perf_counter() - start) * 1000

    epoch = [exchange_ms(steps) for _ in range(calls)]
    one_step = [exchange_ms(1) for _ in range(calls)]
    return {"on_ms": statistics.median(on), "off_ms": statistics.median(off),
            "digest_ms": statistics.median(digest), "epoch_exchange_ms": statistics.median(epoch),
            "step_exchange_ms": statistics.median(one_step)}


def measure(settings: Settings) -> list[dict[str, Any]]:
    """One 2-worker cluster per round; each worker's medians."""
    results: list[dict[str, Any]] = []
    for _ in range(settings.rounds):
        results += on_cluster(worker, WORKERS, {"steps": settings.steps,
                                                "calls": 4 * settings.rounds})
        arrays = on_cluster(arrays_worker, WORKERS, {"megabytes": list(settings.input_megabytes),
                                                     "calls": 3})
        later = on_cluster(later_batches_worker, WORKERS, {"steps": settings.steps,
                                                           "calls": 4 * settings.rounds})
        for result, sizes, generator in zip(results[-WORKERS:], arrays, later):
            result["arrays"], result["later"] = sizes, generator
    return results


def rows(results: list[dict[str, Any]], settings: Settings) -> list[Row]:
    """The check alone, `evaluate` with the check against without it, and the check of
    NumPy arrays per size."""
    return _dataset_rows(results, settings) + [
        _array_row(size, [r["arrays"][str(size)] for r in results])
        for size in settings.input_megabytes] + _later_rows([r["later"] for r in results],
                                                            settings)


def _later_rows(later: list[dict[str, Any]], settings: Settings) -> list[Row]:
    steps = settings.steps
    step_ms = [m["off_ms"] / steps for m in later]
    digest = Stat.of([m["digest_ms"] for m in later])
    share = Stat.of([100 * m["digest_ms"] / s for m, s in zip(later, step_ms)])
    per_step = Stat.of([m["step_exchange_ms"] * steps for m in later])
    return [
        Row(f"later-batch check, {WORKERS} workers: hash of one generator batch "
            f"({train_step.GLOBAL_BATCH}x{train_step.FEATURES} float32 + labels)",
            digest.show(" ms", 3), f"MLP step, check off: {Stat.of(step_ms).show(' ms', 1)}",
            f"{share.show('%', 2)} of a step"),
        Row(f"  exchange of an epoch's {steps} hashes at its end (one gather)",
            Stat.of([m["epoch_exchange_ms"] for m in later]).show(" ms", 2),
            f"one exchange per step instead: {per_step.show(' ms', 1)} per epoch",
            f"{Stat.of([m['step_exchange_ms'] for m in later]).show(' ms', 2)} per step"),
        ratio_row(f"  fit of {steps} generator steps with the input checks",
                  [m["on_ms"] for m in later], "checks off", [m["off_ms"] for m in later],
                  " ms"),
    ]


def _array_row(size: int, measured: list[dict[str, Any]]) -> Row:
    per_gb = Stat.of([m["s"] / (m["bytes"] / 1e9) for m in measured])
    return Row(f"input check, {WORKERS} workers: fit(x, y) on {size} MB of NumPy arrays, "
               "before training",
               Stat.of([m["s"] for m in measured]).show(" s", 3),
               f"per GB: {per_gb.show(' s', 2)}; allocated meanwhile: "
               f"{Stat.of([m['peak_bytes'] / 1e6 for m in measured]).show(' MB', 2)}",
               "-", ARRAY_GOAL.verdict(per_gb.median))


def _dataset_rows(results: list[dict[str, Any]], settings: Settings) -> list[Row]:
    check = Stat.of([r["check_ms"] for r in results])
    share = Stat.of([100 * r["check_ms"] / r["off_ms"] for r in results])
    return [
        Row(f"input check, {WORKERS} workers: first batch hashed + one exchange",
            check.show(" ms", 2),
            f"evaluate of {settings.steps} batches, check off: "
            f"{Stat.of([r['off_ms'] for r in results]).show(' ms', 1)}",
            f"{share.show('%', 1)} of evaluate"),
        ratio_row(f"  evaluate of {settings.steps} batches with the input check",
                  [r["on_ms"] for r in results], "check off", [r["off_ms"] for r in results],
                  " ms"),
    ]
