"""Worker functions for the console tests: a user's script as it would print."""

from __future__ import annotations

import sys
import time

import numpy as np

UNKNOWN_STDERR_LINE = "console_workloads: a warning of the user's own, from w1"
FAILURE = "console_workloads: w1 fails after training, on purpose"


STRAGGLER_SLEEP_S = 0.05


def fit_verbose_everywhere(checkpoints: str, fail_rank: int = -1,
                           straggler_rank: int = -1) -> dict:
    """Every worker calls `fit(verbose=1)` (a script written for one process); worker 1
    writes a line of its own to stderr; worker `fail_rank` raises after training. A
    `ModelCheckpoint` into `checkpoints` saves every epoch and tracks no best (its
    monitor, val_loss, is never logged). Worker `straggler_rank` sleeps after every step."""
    import keras
    import tensorflow as tf

    import disttrain
    from disttrain import coordination

    strategy = disttrain.strategy()
    rank = coordination.get().rank
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1))).batch(8)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    if rank == 1:
        print(UNKNOWN_STDERR_LINE, file=sys.stderr, flush=True)
    checkpoint = disttrain.callbacks.ModelCheckpoint(checkpoints + "/m-{epoch}.keras")
    callbacks = [checkpoint]
    if rank == straggler_rank:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: time.sleep(STRAGGLER_SLEEP_S)))
    history = model.fit(data, epochs=3, verbose=1, callbacks=callbacks)
    if rank == fail_rank:
        raise RuntimeError(FAILURE)
    return {"loss": history.history["loss"]}
