"""Processes of the SidecarEvaluator tests (tests/test_sidecar.py): a tiny model and its data,
an evaluator, and a plain `model.evaluate` of checkpoint files."""

from __future__ import annotations

from typing import Any

from tests.support.models import dense_model


def tiny_data() -> Any:
    """64 fixed samples of 4 features, two classes, in batches of 16."""
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def tiny_model(units: int = 2, seed: int = 0) -> Any:
    """A compiled one-layer classifier; `units` other than 2 is another architecture."""
    model = dense_model(4, outputs=units, output_activation="softmax", seed=seed)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def evaluate_directory(checkpoint_dir: str, log_dir: str, poll_interval: float = 0.2,
                       timeout: float = 120.0) -> list[dict]:
    """Runs a SidecarEvaluator of the tiny model on `checkpoint_dir` until training ends."""
    import disttrain

    disttrain.strategy()
    return disttrain.SidecarEvaluator(tiny_model, tiny_data(), checkpoint_dir, log_dir=log_dir,
                                      poll_interval=poll_interval, timeout=timeout).start()


def evaluate_files(paths: list[str], batch_size: int) -> list[dict]:
    """`model.evaluate` of each `.keras` file on the demo's validation data."""
    import keras

    from disttrain import demo

    _, val_ds = demo.datasets(batch_size)
    return [keras.models.load_model(path).evaluate(val_ds, verbose=0, return_dict=True)
            for path in paths]
