"""SyncStop: asks for a stop vote after every batch; the per-epoch vote needs no callback."""

from __future__ import annotations

import keras


class SyncStop(keras.callbacks.Callback):
    """Carries the stop-agreement option; every worker already stops together at epoch ends.

    Under multi-worker training, `disttrain.keras_compat` (applied by
    `disttrain.strategy()`) makes every worker vote on `model.stop_training`
    after all callbacks' `on_epoch_end`: a stop asked by any callback on any
    worker ends `fit` on every worker after the same epoch, wherever the callback
    sits in the list. `SyncStop()` therefore does nothing itself, at any position;
    it is kept so that existing scripts work unchanged.

    Callbacks that stop in the middle of an epoch (from `on_train_batch_end`)
    need `SyncStop(per_batch=True)` anywhere in the list: the workers then also
    vote after every training batch (one more exchange per batch).

    Args:
        per_batch: also vote after every training batch.

    Example:

    ```python
    model.fit(ds, epochs=10, callbacks=[MyMidEpochStopper(),
                                        disttrain.callbacks.SyncStop(per_batch=True)])
    ```
    """

    def __init__(self, per_batch: bool = False):
        super().__init__()
        self.per_batch = per_batch

    @property
    def agree_stop_per_batch(self) -> bool:
        """Read by `keras_compat.stop_agreement`: whether to vote after every batch."""
        return self.per_batch
