"""Early stopping on a real overfitting run: the digits demo for a fixed number of
epochs (no callbacks) vs the same model and data with disttrain's recommended stack
(ReduceLROnPlateau, EarlyStopping restoring the best weights, ModelCheckpoint,
CSVLogger, SyncStop; TensorBoard off)."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from benchmarks.cluster import on_cluster
from benchmarks.report import Row, ratio_row
from benchmarks.settings import Settings

BATCH = 64
LEARNING_RATE = 0.01


def worker(epochs: int, directory: str | None) -> dict[str, Any]:
    """Trains the demo model; with `directory`, under the recommended callback stack."""
    import disttrain
    from disttrain import demo

    strategy = disttrain.strategy()
    train, val = demo.datasets(BATCH)
    with strategy.scope():
        model = demo.build_model(LEARNING_RATE)
    callbacks = (disttrain.callbacks.recommended(directory, tensorboard=False)
                 if directory else [])
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks,
                        shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    val_losses = history.history["val_loss"]
    return {
        "epochs": len(val_losses),
        "seconds": seconds,
        "best_epoch": 1 + min(range(len(val_losses)), key=val_losses.__getitem__),
        "best_val_loss": min(val_losses),
        "final_val_loss": model.evaluate(val, verbose=0, return_dict=True)["loss"],
    }


def measure(settings: Settings, workers: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as tmp:
        stack = on_cluster(worker, workers, {"epochs": settings.demo_epochs, "directory": tmp})
    fixed = on_cluster(worker, workers, {"epochs": settings.demo_epochs, "directory": None})
    return {"stack": stack[0], "fixed": fixed[0]}


def rows(measured: dict[str, Any], settings: Settings, workers: int = 2) -> list[Row]:
    stack, fixed = measured["stack"], measured["fixed"]
    equal = math.isclose(stack["final_val_loss"], stack["best_val_loss"], rel_tol=1e-6)
    timed = ratio_row(
        f"digits demo, {workers} workers: wall time to a trained model",
        [stack["seconds"]], f"fixed {settings.demo_epochs} epochs, no callbacks",
        [fixed["seconds"]], " s")
    return [
        Row(timed.what, f"{timed.disttrain} ({stack['epochs']} epochs)",
            f"{timed.peer} ({fixed['epochs']} epochs)", timed.ratio,
            f"saved {fixed['epochs'] - stack['epochs']} epochs, "
            f"{fixed['seconds'] - stack['seconds']:.0f} s"),
        Row("  val_loss: best epoch -> model after fit",
            f"{stack['best_val_loss']:.4f} (epoch {stack['best_epoch']}) -> "
            f"{stack['final_val_loss']:.4f}",
            f"{fixed['best_val_loss']:.4f} (epoch {fixed['best_epoch']}) -> "
            f"{fixed['final_val_loss']:.4f}", "-", f"equal (1e-6): {'met' if equal else 'MISSED'}"),
    ]
