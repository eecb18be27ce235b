"""Worker functions: a stop asked on one worker only, with no SyncStop placed last."""

from __future__ import annotations

import numpy as np

from tests.support.models import dense_model


def stop_on_one_worker(stop_rank: int, stop_epoch: int, stop_batch: int | None = None,
                       epochs: int = 6, reduce_lr_on_ranks: tuple[int, ...] = (0, 1)) -> dict:
    """fit with a custom stopper placed FIRST, then disttrain's EarlyStopping and
    ReduceLROnPlateau (neither would stop; the latter only on `reduce_lr_on_ranks`); no
    SyncStop, unless `stop_batch` is given: then the stopper stops at that batch of
    `stop_epoch` and `SyncStop(per_batch=True)` asks for per-batch votes, from the first
    place in the list.

    Returns the epochs each worker ran, the batches it trained in each, and the call
    site of each exchange it made after each epoch began (or the error `fit` raised)."""
    import keras
    import tensorflow as tf

    from disttrain import callbacks, coordination
    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    coordinator = coordination.get()
    rank = coordinator.rank
    exchanges: list[list[str]] = []
    gather = coordinator.gather

    def counted_gather(name, value, timeout=None):
        if exchanges:
            exchanges[-1].append(name)
        return gather(name, value, timeout)

    coordinator.gather = counted_gather
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with strategy.scope():
        model = dense_model(4)
        model.compile(keras.optimizers.SGD(0.01), "mse")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    class StopOnThisWorker(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if stop_batch is not None and (rank, self.epoch, batch) == (
                    stop_rank, stop_epoch, stop_batch):
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            exchanges.append([])

        def on_epoch_end(self, epoch, logs=None):
            if stop_batch is None and (rank, epoch) == (stop_rank, stop_epoch):
                self.model.stop_training = True

    class CountBatches(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.batches.append(0)

        def on_train_batch_end(self, batch, logs=None):
            self.batches[-1] += 1

    counter = CountBatches()
    stack = [StopOnThisWorker()]
    if stop_batch is not None:
        stack.insert(0, callbacks.SyncStop(per_batch=True))
    stack.append(callbacks.EarlyStopping(monitor="loss", patience=100))
    if rank in reduce_lr_on_ranks:
        stack.append(callbacks.ReduceLROnPlateau(monitor="loss", patience=100))
    stack.append(counter)
    try:
        history = model.fit(train, epochs=epochs, callbacks=stack, verbose=0)
    except Exception as e:  # noqa: BLE001 - the test compares every worker's error
        return {"error": f"{type(e).__name__}: {e}"}
    return {"epochs_run": len(history.history["loss"]), "batches": counter.batches,
            "exchanges": exchanges}
