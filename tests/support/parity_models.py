"""Small models, data and fits for Keras-parity tests of single callbacks, in the style of
Keras's own callback tests."""

from __future__ import annotations

import keras
import numpy as np

TRAIN_SAMPLES = 10
TEST_SAMPLES = 10
INPUT_DIM = 3
BATCH_SIZE = 4


def parity_data():
    rng = np.random.default_rng(1337)
    x_train = rng.random((TRAIN_SAMPLES, INPUT_DIM)).astype("float32")
    y_train = rng.random((TRAIN_SAMPLES, 2)).astype("float32")
    x_test = rng.random((TEST_SAMPLES, INPUT_DIM)).astype("float32")
    y_test = rng.random((TEST_SAMPLES, 2)).astype("float32")
    return x_train, y_train, x_test, y_test


def parity_model(optimizer=None, metrics=None):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((INPUT_DIM,)), keras.layers.Dense(5, name="hidden"),
         keras.layers.Dense(2, name="out")],
        name="net",
    )
    model.compile(loss="mse", optimizer=optimizer or keras.optimizers.Adam(0.1),
                  metrics=metrics)
    return model


def parity_fit(model, callbacks, epochs=2, validation=True, **kwargs):
    x_train, y_train, x_test, y_test = parity_data()
    return model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0,
        validation_data=(x_test, y_test) if validation else None,
        callbacks=callbacks, **kwargs,
    )


def learning_rate_of(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


