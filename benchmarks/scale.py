"""Scale: what agreement costs at 2 to 16 local processes, and a model for 64-256 workers.

Each worker count gets a fresh localhost cluster whose processes share this
machine's cores, one TensorFlow thread each (`launch.local`'s default for that
many tasks here). In the same processes it measures, per call: a vote
(`coordination.any`) against a compiled MWMS all-reduce of one flag, the
checkpoint decision (`run_on_chief`: the chief acts, every worker gets its
outcome), the BatchNormalization sync, and within a real `fit` what the
deciding callbacks cost per epoch. The written model extrapolates the
coordination service's load and a vote's latency to 64-256 workers.
"""

from __future__ import annotations

import statistics
import textwrap
from typing import Any

from benchmarks import vote
from benchmarks.cluster import on_cluster
from benchmarks.report import Goal, Row, Stat
from benchmarks.settings import Settings
from benchmarks.timing import median_ms
from launch import local as launch_local

FEATURES = 32
GLOBAL_BATCH = 64
# Calls one exchange makes to the chief's key-value store (disttrain.coordination):
# every worker's entry (N writes), the chief reading the N-1 others, the combined
# value written once and read by the N-1 others.
CALLS_PER_EXCHANGE = "3N - 1"


def _calls_per_exchange(n: int) -> int:
    return 3 * n - 1


def scale_worker(epochs: int, steps: int, calls: int) -> dict[str, Any]:
    """Runs in every worker: the per-call costs and the per-epoch agreement overhead."""
    import keras
    import numpy as np
    import tensorflow as tf

    import disttrain
    from disttrain import coordination, keras_compat

    strategy = disttrain.strategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(64),
                                  keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * steps, FEATURES)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True))).batch(
        GLOBAL_BATCH)
    coord = coordination.get()
    result = vote.in_process(keras, model, dataset, epochs, calls)
    result["checkpoint_decision_ms"] = median_ms(
        lambda: coord.run_on_chief("bench.checkpoint", lambda: {"saved": True}), calls)
    result["bn_sync_ms"] = median_ms(lambda: keras_compat.sync_batchnorm_statistics(model),
                                     max(calls // 5, 3))
    return result


def measure(settings: Settings) -> dict[int, list[dict[str, Any]]]:
    """One cluster per worker count of `settings.scale_workers`, `settings.rounds` rounds."""
    measured: dict[int, list[dict[str, Any]]] = {n: [] for n in settings.scale_workers}
    for _ in range(settings.rounds):
        for n in settings.scale_workers:
            env = launch_local.thread_env(launch_local.threads_per_task(n))
            measured[n] += on_cluster(
                scale_worker, n, {"epochs": settings.epochs, "steps": settings.steps,
                                  "calls": settings.collective_calls},
                env=env, timeout=900)
    return measured


def rows(measured: dict[int, list[dict[str, Any]]]) -> list[Row]:
    """Per worker count: the vote against the compiled all-reduce (goal <= 1.0x), the
    checkpoint decision, the BN sync and the deciding callbacks' share of an epoch
    (goal <= 1%). Medians over every worker of every round."""
    result = []
    for n, results in measured.items():
        ratio = Stat.of([r["vote_ms"] / r["flag_all_reduce_ms"] for r in results])
        share = Stat.of([100 * r["decisions_per_epoch_ms"] / r["decisions_epoch_ms"]
                         for r in results])
        flag = Stat.of([r["flag_all_reduce_ms"] for r in results])
        result += [
            Row(f"scale, {n} workers: vote (coordination.any)",
                Stat.of([r["vote_ms"] for r in results]).show(" ms", 2),
                f"compiled all-reduce of a flag: {flag.show(' ms', 2)}", ratio.show("x", 2),
                Goal(1.0).verdict(ratio.median)),
            Row(f"scale, {n} workers: checkpoint decision (run_on_chief)",
                Stat.of([r["checkpoint_decision_ms"] for r in results]).show(" ms", 2),
                f"compiled all-reduce of a flag: {flag.show(' ms', 2)}",
                Stat.of([r["checkpoint_decision_ms"] / r["flag_all_reduce_ms"]
                         for r in results]).show("x", 2)),
            Row(f"scale, {n} workers: BatchNormalization sync",
                Stat.of([r["bn_sync_ms"] for r in results]).show(" ms", 2),
                f"compiled all-reduce of a flag: {flag.show(' ms', 2)}",
                Stat.of([r["bn_sync_ms"] / r["flag_all_reduce_ms"]
                         for r in results]).show("x", 2)),
            Row(f"scale, {n} workers: agreement per epoch (deciding callbacks over Keras's, + one exchange)",
                Stat.of([r["decisions_per_epoch_ms"] for r in results]).show(" ms", 2),
                "the epoch: " + Stat.of([r["decisions_epoch_ms"] for r in results]).show(
                    " ms", 0), f"{share.show('%', 2)} of epoch",
                Goal(1.0, "%").verdict(share.median)),
        ]
    return result


def model(measured: dict[int, list[dict[str, Any]]]) -> str:
    """The written model for 64-256 workers, from this run's numbers."""
    counts = sorted(measured)
    votes = [statistics.median(r["vote_ms"] for r in measured[n]) for n in counts]
    if len(counts) > 1:
        slope, intercept = _fit_line(counts, votes)
    else:
        slope, intercept = 0.0, votes[0]
    largest = counts[-1]
    per_call_ms = votes[-1] / _calls_per_exchange(largest) if largest > 1 else votes[-1]
    sentences = [
        (f"Agreement model: an exchange (a vote, a checkpoint decision) makes {CALLS_PER_EXCHANGE}"
         " calls to the coordination service on the chief: each worker writes its entry "
         "(about 60 bytes for a vote) and reads one combined value (about 10 bytes per worker), "
         "the chief reads the N-1 entries, so every worker makes 2 calls whatever N and the "
         "chief's service answers 3N-1 calls per exchange in two hops of latency plus the "
         "chief's N-1 local reads."),
        (f"Measured here ({', '.join(f'N={n}: {v:.2f} ms' for n, v in zip(counts, votes))}, "
         f"every process sharing the same cores): a vote takes about {intercept:.2f} ms + "
         f"{slope:.3f} ms per worker (least squares), i.e. about {per_call_ms:.3f} ms of the "
         f"service's time per call at N={largest}."),
        (f"Extrapolated with that line (it is an upper bound for the slope: here the N "
         f"processes also compete for the CPU the service runs on): N=64: "
         f"{intercept + 64 * slope:.1f} ms and {_calls_per_exchange(64)} calls per vote, N=256: "
         f"{intercept + 256 * slope:.1f} ms and {_calls_per_exchange(256)} calls. At one vote "
         "per epoch (the default) that is negligible; per batch (SyncStop(per_batch=True)) at "
         f"256 workers it would cost {intercept + 256 * slope:.0f} ms a step and "
         f"{_calls_per_exchange(256)} calls on the chief per step, so keep per-batch votes "
         "for jobs that need them. TerminateOnNaN votes only where Keras's logs are not "
         "all-reduced (never under disttrain.strategy())."),
        ("Assumptions: one coordination service on the chief answering calls one after "
         "another (its per-call cost measured here), gRPC latency between hosts below the "
         "per-call cost measured here on loopback, no other load on the chief's CPU."),
    ]
    return textwrap.fill(" ".join(sentences), 100, break_on_hyphens=False)


def _fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    return slope, mean_y - slope * mean_x
