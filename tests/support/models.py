"""Tiny Keras models for tests, and the data and fit of the one-process Keras-parity tests.

One builder covers the models that are only the means of a test (a regressor, a classifier,
one with BatchNormalization); a model whose structure is what a test checks (a custom layer
or train step, the architectures of the parity matrix) is built where it is tested
(tests/README.md). Keras is imported when a builder runs, so workload modules may import
this one at their top.

```
dense_model(4)                                  # Input(4) -> Dense(1): a linear regressor
dense_model(6, [8], activation="relu", output_activation="sigmoid", seed=3)
dense_model(8, [16], batchnorm=True, seed=1)    # Dense(16) -> BatchNormalization -> Dense(1)
parity_fit(parity_model(), callbacks)           # Keras's own callback-test model and data
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TRAIN_SAMPLES = 10
TEST_SAMPLES = 10
INPUT_DIM = 3
BATCH_SIZE = 4


def one_process_scope() -> Any:
    """The scope to build a one-process reference model in, inside a worker of a
    multi-worker cluster: a `OneDeviceStrategy` on the CPU (disttrain's preflight refuses
    `fit` of a model built outside any strategy's scope there, as each worker would train
    alone by mistake)."""
    import tensorflow as tf

    return tf.distribute.OneDeviceStrategy("/cpu:0").scope()


def dense_model(inputs: int, hidden: Sequence[int] = (), outputs: int = 1, *,
                activation: str | None = None, output_activation: str | None = None,
                batchnorm: bool = False, kernel_initializer: str = "glorot_uniform",
                seed: int | None = None, name: str | None = None) -> Any:
    """An uncompiled `keras.Sequential` of Dense layers on a flat input.

    Built in the caller's strategy scope and dtype policy; compile it there too. The same
    arguments after the same seed give the same initial weights.

    Args:
        inputs: the number of input features.
        hidden: the width of each hidden Dense layer, in order.
        outputs: the width of the output Dense layer.
        activation: the hidden layers' activation (None: linear).
        output_activation: the output layer's activation (None: linear).
        batchnorm: a `BatchNormalization` after each hidden layer.
        kernel_initializer: every Dense layer's kernel initializer.
        seed: when given, `keras.utils.set_random_seed(seed)` first (Python, NumPy and
            TensorFlow), so that the initial weights are the seed's.
        name: the model's name; when given, the layers are named too (`hidden`,
            `hidden_1`, ..., `norm`, ..., `out`), so that two models built in one process
            have the same variable paths (summaries, files compared by path).

    Example:

    ```python
    with strategy.scope():
        model = dense_model(4, [8], activation="relu", seed=1)
        model.compile(keras.optimizers.SGD(0.05), "mse")
    ```
    """
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)

    def named(base: str, index: int) -> str | None:
        return None if name is None else (f"{base}_{index}" if index else base)

    layers = [keras.Input((inputs,))]
    for index, width in enumerate(hidden):
        layers.append(keras.layers.Dense(width, activation=activation, name=named("hidden", index),
                                         kernel_initializer=kernel_initializer))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(name=named("norm", index)))
    layers.append(keras.layers.Dense(outputs, activation=output_activation,
                                     name=named("out", 0), kernel_initializer=kernel_initializer))
    return keras.Sequential(layers, name=name)


def parity_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_train, y_train, x_test, y_test of the Keras-parity callback tests (fixed values)."""
    rng = np.random.default_rng(1337)
    x_train = rng.random((TRAIN_SAMPLES, INPUT_DIM)).astype("float32")
    y_train = rng.random((TRAIN_SAMPLES, 2)).astype("float32")
    x_test = rng.random((TEST_SAMPLES, INPUT_DIM)).astype("float32")
    y_test = rng.random((TEST_SAMPLES, 2)).astype("float32")
    return x_train, y_train, x_test, y_test


def parity_model(optimizer: Any = None, metrics: list | None = None) -> Any:
    """The model of Keras's own callback tests, compiled: 3 -> Dense(5) -> Dense(2), seed 1,
    named layers (so ours and Keras's callback write the same summary tags)."""
    import keras

    model = dense_model(INPUT_DIM, [5], 2, seed=1, name="net")
    model.compile(loss="mse", optimizer=optimizer or keras.optimizers.Adam(0.1),
                  metrics=metrics)
    return model


def parity_fit(model: Any, callbacks: list, epochs: int = 2, validation: bool = True,
               **kwargs: Any) -> Any:
    """`model.fit` on `parity_data()` in batches of `BATCH_SIZE`; its History."""
    x_train, y_train, x_test, y_test = parity_data()
    return model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0,
        validation_data=(x_test, y_test) if validation else None,
        callbacks=callbacks, **kwargs,
    )


def learning_rate_of(model: Any) -> float:
    """The optimizer's current learning rate as a float."""
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
