"""Scaling: throughput of the train-step MLP on 1, 2 and 4 workers here, and a model of
what to expect on a real cluster, from the all-reduce cost measured here."""

from __future__ import annotations

import os
import textwrap
from typing import Any

from benchmarks.report import Row, Stat
from benchmarks.settings import Settings
from benchmarks.train_step import GLOBAL_BATCH, step_ms


def _step_ms(measured: dict[str, list], workers: int, steps: int) -> list[float]:
    key = {1: "single", 2: "disttrain"}.get(workers, f"disttrain_{workers}")
    return [step_ms(r, steps) for r in measured[key]]


def rows(measured: dict[str, list], settings: Settings) -> list[Row]:
    one = Stat.of([GLOBAL_BATCH / ms * 1000 for ms in _step_ms(measured, 1, settings.steps)])
    result = []
    for n in settings.scaling_workers:
        rate = Stat.of([GLOBAL_BATCH / ms * 1000 for ms in _step_ms(measured, n, settings.steps)])
        result.append(Row(
            f"throughput, {n} worker(s) on {os.cpu_count()} cores (samples/s)", rate.show("", 0),
            f"1 process: {one.show('', 0)}", f"{rate.median / one.median:.2f}x"))
    return result


def model(measured: dict[str, list], settings: Settings) -> str:
    """The written scaling model, with this run's numbers."""
    dist: list[dict[str, Any]] = measured["disttrain"]
    megabytes = dist[0]["gradient_bytes"] / 1e6
    gradient_ms = Stat.of([r["gradient_ms"] for r in dist]).median
    latency_ms = Stat.of([r["scalars_packed_ms"] for r in dist]).median
    single_ms = Stat.of(_step_ms(measured, 1, settings.steps)).median

    def all_reduce_ms(n: int, gbit: float = 10, hop_ms: float = 0.05) -> float:
        return 2 * (n - 1) / n * megabytes / (gbit / 8) + 2 * (n - 1) * hop_ms

    def speedup(n: int) -> float:
        return single_ms / (single_ms / n + all_reduce_ms(n))

    compute_ms = Stat.of([step_ms(r, settings.steps) for r in measured["independent"]]).median
    capped_ms = Stat.of([step_ms(r, settings.steps)
                         for r in measured["independent_capped"]]).median
    floor_ms = capped_ms + gradient_ms + latency_ms
    sentences = [
        (f"Scaling model: each step all-reduces the gradients once ({megabytes:.1f} MB float32 "
        "for this MLP) and the step's metrics once (a few bytes)."),
        ("A ring all-reduce over N workers sends and receives 2(N-1)/N of the bytes per worker "
        "in 2(N-1) latency-bound hops: t_step(N) = t_compute(global batch)/N "
        "+ 2(N-1)/N * bytes/bandwidth + 2(N-1) * hop latency (no overlap assumed)."),
        (f"Measured here: {gradient_ms:.1f} ms for the {megabytes:.1f} MB all-reduce between 2 "
        f"processes over loopback gRPC (about {megabytes / gradient_ms:.2f} GB/s, CPU-bound: "
        f"both processes share {os.cpu_count()} cores), {latency_ms:.1f} ms for a small one, "
        f"{single_ms:.1f} ms for a 1-process step."),
        ("On one machine the workers split the cores the single process has to itself: 2 "
         "processes computing their half batches at the same time, with no communication, take "
         f"{compute_ms:.1f} ms a step ({compute_ms / single_ms:.2f}x the 1-process step) with "
         f"TensorFlow's default thread pools and {capped_ms:.1f} ms "
         f"({capped_ms / single_ms:.2f}x) with the pools launch.local gives each task, so a "
         f"2-worker step costs at least {capped_ms:.1f} + {gradient_ms:.1f} + {latency_ms:.1f} "
         f"= {floor_ms:.1f} ms ({floor_ms / single_ms:.1f}x the 1-process step): 1.3x is out of "
         "reach here without sending fewer bytes (compressed gradients, which change the "
         "results) or a faster transport between processes than TensorFlow's gRPC."),
        ("On a cluster of hosts like this one with 10 Gbit/s between them and 50 us per hop, "
        f"the all-reduce takes about {all_reduce_ms(2):.1f} ms at N=2, {all_reduce_ms(8):.1f} ms "
        f"at N=8 and {all_reduce_ms(64):.1f} ms at N=64 (the bytes term tends to 2x the "
        "gradients; the hop term grows with N), so this small MLP would speed up about "
        f"{speedup(2):.1f}x, {speedup(8):.1f}x and {speedup(64):.1f}x: it is communication-bound. "
        "Models whose per-worker compute per step is well above the all-reduce time scale "
        "near-linearly; gradient bytes grow with parameters, compute with parameters times "
        "batch, so larger per-worker batches scale better."),
    ]
    return textwrap.fill(" ".join(sentences), 100, break_on_hyphens=False)
