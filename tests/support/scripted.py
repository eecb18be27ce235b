"""Drive one callback with a scripted metric sequence, without training (one process)."""

from __future__ import annotations

import numpy as np

from tests.support.models import dense_model


def tiny_model():
    """A compiled 3 -> Dense(2) -> Dense(1) regressor (the default model of `drive`)."""
    model = dense_model(3, [2])
    model.compile("sgd", "mse", metrics=["mae"])
    return model


def tiny_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def drive(callback, values, key="val_loss", model=None):
    """Feeds a scripted metric sequence; returns the epoch after which training stopped."""
    model = model or tiny_model()
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {key: value, "loss": value})
        if model.stop_training:
            callback.on_train_end()
            return epoch
    callback.on_train_end()
    return None


