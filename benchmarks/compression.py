"""Gradient compression: the 2-worker train step and the digits demo's accuracy with the
gradient all-reduce in bfloat16 (`disttrain.strategy(gradient_compression="bf16")`)
against float32, side by side in this run."""

from __future__ import annotations

from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Row, Stat, paired_ratios, ratio_row
from benchmarks.settings import Settings
from benchmarks.train_step import GLOBAL_BATCH, WIDTH, keras3_worker, step_ms
from launch import local as launch_local

COMPRESSION = "bf16"
BATCH = 64
LEARNING_RATE = 0.01


def worker(epochs: int, steps: int, demo_epochs: int,
           gradient_compression: str) -> dict[str, Any]:
    """In one process: the MLP's epoch time, then the digits demo model trained for
    `demo_epochs` (same seed and data order on both sides) and evaluated."""
    import disttrain
    from disttrain import demo

    result = keras3_worker(epochs, steps, calls=0, extras=False,
                           gradient_compression=gradient_compression)
    train, val = demo.datasets(BATCH)
    with disttrain.strategy(gradient_compression=gradient_compression).scope():
        model = demo.build_model(LEARNING_RATE)
    model.fit(train, epochs=demo_epochs, shuffle=False, verbose=0)
    result["demo"] = model.evaluate(val, verbose=0, return_dict=True)
    return result


def measure(settings: Settings, workers: int = 2) -> dict[str, Any]:
    """Interleaved rounds with and without compression, `launch.local`'s thread caps."""
    kwargs = {"epochs": settings.epochs, "steps": settings.steps,
              "demo_epochs": max(2, settings.demo_epochs // 4)}
    env = launch_local.thread_env(launch_local.threads_per_task(workers))
    measured: dict[str, list] = {"none": [], COMPRESSION: []}
    for round_ in range(settings.rounds):
        order = ["none", COMPRESSION] if round_ % 2 == 0 else [COMPRESSION, "none"]
        for name in order:
            measured[name] += on_cluster(worker, workers,
                                         {**kwargs, "gradient_compression": name}, env=env)[:1]
    return {"sides": measured, "demo_epochs": kwargs["demo_epochs"]}


def rows(measured: dict[str, Any], settings: Settings, workers: int = 2) -> list[Row]:
    plain, compressed = measured["sides"]["none"], measured["sides"][COMPRESSION]

    def demo(results: list[dict[str, Any]], metric: str) -> Stat:
        return Stat.of([r["demo"][metric] for r in results])

    return [
        ratio_row(f"train step, MLP 3x{WIDTH}, batch {GLOBAL_BATCH}, {workers} workers, "
                  f"gradients all-reduced in {COMPRESSION}",
                  [step_ms(r, settings.steps) for r in compressed], "float32",
                  [step_ms(r, settings.steps) for r in plain], " ms"),
        Row(f"  digits demo after {measured['demo_epochs']} epochs, {workers} workers: "
            f"val_loss / accuracy with {COMPRESSION}",
            f"{demo(compressed, 'loss').show('', 4)} / {demo(compressed, 'accuracy').show('', 4)}",
            f"float32: {demo(plain, 'loss').show('', 4)} / {demo(plain, 'accuracy').show('', 4)}",
            paired_ratios([r["demo"]["loss"] for r in compressed],
                          [r["demo"]["loss"] for r in plain]).show("x", 3)),
    ]
