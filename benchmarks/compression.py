"""Gradient compression: the 2-worker train step and the digits demo's accuracy with the
gradient all-reduce in bfloat16 (`disttrain.strategy(gradient_compression="bf16")`)
against float32, side by side in this run."""

from __future__ import annotations

from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Row, ratio_row
from benchmarks.settings import Settings
from benchmarks.train_step import GLOBAL_BATCH, WIDTH, keras3_worker, step_ms
from launch import local as launch_local

COMPRESSION = "bf16"
BATCH = 64
LEARNING_RATE = 0.01


def demo_worker(epochs: int, gradient_compression: str) -> dict[str, Any]:
    """The digits demo model for a fixed number of epochs, same seed and data order."""
    import disttrain
    from disttrain import demo

    strategy = disttrain.strategy(gradient_compression=gradient_compression)
    train, val = demo.datasets(BATCH)
    with strategy.scope():
        model = demo.build_model(LEARNING_RATE)
    model.fit(train, epochs=epochs, shuffle=False, verbose=0)
    return model.evaluate(val, verbose=0, return_dict=True)


def measure(settings: Settings, workers: int = 2) -> dict[str, Any]:
    """Interleaved rounds of the MLP step with and without compression (launch.local's
    thread caps), then the demo trained once each way."""
    base = {"epochs": settings.epochs, "steps": settings.steps, "calls": 0, "extras": False}
    env = launch_local.thread_env(launch_local.threads_per_task(workers))
    steps: dict[str, list] = {"none": [], COMPRESSION: []}
    for round_ in range(settings.rounds):
        order = ["none", COMPRESSION] if round_ % 2 == 0 else [COMPRESSION, "none"]
        for name in order:
            steps[name] += on_cluster(keras3_worker, workers,
                                      {**base, "gradient_compression": name}, env=env)[:1]
    epochs = max(2, settings.demo_epochs // 4)
    demo = {name: on_cluster(demo_worker, workers,
                             {"epochs": epochs, "gradient_compression": name})[0]
            for name in ("none", COMPRESSION)}
    return {"steps": steps, "demo": demo, "demo_epochs": epochs}


def rows(measured: dict[str, Any], settings: Settings, workers: int = 2) -> list[Row]:
    steps, demo = measured["steps"], measured["demo"]
    plain, compressed = demo["none"], demo[COMPRESSION]
    return [
        ratio_row(f"train step, MLP 3x{WIDTH}, batch {GLOBAL_BATCH}, {workers} workers, "
                  f"gradients all-reduced in {COMPRESSION}",
                  [step_ms(r, settings.steps) for r in steps[COMPRESSION]], "float32",
                  [step_ms(r, settings.steps) for r in steps["none"]], " ms"),
        Row(f"  digits demo after {measured['demo_epochs']} epochs, {workers} workers: "
            f"val_loss / accuracy with {COMPRESSION}",
            f"{compressed['loss']:.4f} / {compressed['accuracy']:.4f}",
            f"float32: {plain['loss']:.4f} / {plain['accuracy']:.4f}",
            f"{compressed['loss'] / plain['loss']:.3f}x"),
    ]
