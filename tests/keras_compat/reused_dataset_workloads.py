"""Worker function: a reshuffling dataset object used again after `fit`, `evaluate` and
`predict`, under disttrain's persistent epoch iterator and under plain Keras.

A `shuffle(..., seed=S)` that reshuffles each iteration draws new seeds from a
generator its dataset object owns, once per new iterator. Whatever disttrain does
while training, the next `for batch in dataset` must give every worker the order
plain Keras in one process would give it there.
"""

from __future__ import annotations

import os
import time

from tests.support.models import dense_model

SAMPLES = 16
GLOBAL_BATCH = 8  # 2 batches per pass: a prefetch of a few batches spans several passes


def _dataset(seed: int):
    """A seeded, reshuffling dataset of sample ids (x = y = id)."""
    import tensorflow as tf

    ids = tf.range(SAMPLES, dtype=tf.float32)[:, None]
    return tf.data.Dataset.from_tensor_slices((ids, ids)).shuffle(SAMPLES, seed=seed).batch(
        GLOBAL_BATCH)


def _order(dataset) -> list[int]:
    """One new pass over `dataset`: its sample ids in order (this draws once, as a
    user's loop would)."""
    return [int(v) for _, ids in dataset for v in ids.numpy().ravel()]


def _draws(dataset, seed: int) -> int | None:
    """How many passes `dataset`'s shuffle drew before this one (which it draws): the
    index of its next order among a fresh dataset's first 64 passes, None if none."""
    fresh = _dataset(seed)
    orders = [_order(fresh) for _ in range(64)]
    order = _order(dataset)
    return orders.index(order) if order in orders else None


def _uses(model) -> list[int | None]:
    """`fit` (with validation), `evaluate`, `predict` and a second `fit` on the same two
    dataset objects, each followed by a new pass over them: how many passes their
    shuffles had drawn (`_draws`). A
    callback sleeps at every epoch's and validation's end, so the input's prefetching
    runs ahead into later passes of a repeated input."""
    import keras

    class Pause(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(0.2)

        def on_test_end(self, logs=None):
            time.sleep(0.2)

    train, val = _dataset(7), _dataset(11)
    model.fit(train, validation_data=val, epochs=3, verbose=0, callbacks=[Pause()])
    draws = [_draws(train, 7), _draws(val, 11)]
    model.evaluate(train, verbose=0, callbacks=[Pause()])
    draws.append(_draws(train, 7))
    model.predict(val, verbose=0)
    draws.append(_draws(val, 11))
    model.fit(train, epochs=2, verbose=0, callbacks=[Pause()])
    draws.append(_draws(train, 7))
    return draws


def _model():
    import keras

    model = dense_model(1)
    model.compile(keras.optimizers.SGD(0.001), "mse")
    return model


def reused_dataset_orders() -> dict:
    """`_uses` under disttrain's multi-worker strategy (the persistent epoch iterator;
    the input check off, since its fingerprint takes a draw of its own), then under
    plain Keras in this process alone, with a one-device strategy (under any strategy
    Keras builds the model from one more iterator of the first `fit`'s input).

    Returns:
        `{"disttrain": [...], "keras": [...]}`: `_uses`'s draws.
    """
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy
    from disttrain.keras_compat import input_check

    os.environ[input_check.ENV_DISABLE] = "0"
    strategy = make_strategy()
    with strategy.scope():
        model = _model()
    ours = _uses(model)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = _model()
    return {"disttrain": ours, "keras": _uses(model)}
