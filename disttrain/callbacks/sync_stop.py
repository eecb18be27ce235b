"""SyncStop: makes any callback's `model.stop_training` agree across workers."""

from __future__ import annotations

import keras

from disttrain.callbacks.base import DistributedCallback


class SyncStop(DistributedCallback, keras.callbacks.Callback):
    """Stops every worker when any callback on any worker asked to stop.

    A stop decision taken on one worker only (a third-party or custom callback
    setting `model.stop_training = True`) makes that worker leave `fit` while
    the others block in the next collective forever. Put `SyncStop` last in the
    callback list: at each epoch end it votes, and if any worker wants to stop,
    all stop after the same epoch.

    Callbacks that stop in the middle of an epoch (from `on_train_batch_end`)
    need `per_batch=True`, which votes after every batch (about 0.9 ms per batch
    on loopback with 2 workers).

    Args:
        per_batch: also vote after every training batch.

    Example:

    ```python
    model.fit(ds, epochs=10, callbacks=[MyCustomStopper(), disttrain.callbacks.SyncStop()])
    ```
    """

    def __init__(self, per_batch: bool = False):
        super().__init__()
        self.per_batch = per_batch

    def on_train_batch_end(self, batch, logs=None):
        if self.per_batch:
            self._sync("SyncStop.batch")

    def on_epoch_end(self, epoch, logs=None):
        self._sync("SyncStop.epoch")

    def _sync(self, name: str) -> None:
        if self.coordinator.any(bool(self.model.stop_training), name):
            self.model.stop_training = True
