"""Stop agreement: a stop asked by any callback on any worker ends `fit` on every worker.

Keras reads `model.stop_training` on each worker alone: a callback that stops
on one worker makes it leave `fit` while the others wait in the next collective.
After all callbacks' `on_epoch_end` ran, the workers vote once on whether any
of them wants to stop, and every worker sets the result, so the callbacks'
order does not matter. Per-batch votes (for callbacks that stop inside an
epoch) run only when a callback in the list has a true attribute
`PER_BATCH_ATTRIBUTE`, as `disttrain.callbacks.SyncStop(per_batch=True)` does.
A no-op outside multi-worker training.
See `docs/keras_compat.md#stop-agreement`.
"""

from __future__ import annotations

import functools
import threading

from disttrain.keras_compat import detection

PER_BATCH_ATTRIBUTE = "agree_stop_per_batch"
"""A callback with this attribute true asks for a stop vote after every training batch."""

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Wraps `CallbackList.on_epoch_end` and `on_train_batch_end` (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        from keras.src.callbacks.callback_list import CallbackList

        epoch_end, batch_end = CallbackList.on_epoch_end, CallbackList.on_train_batch_end

        @functools.wraps(epoch_end)
        def on_epoch_end(self, epoch, logs=None):
            epoch_end(self, epoch, logs)
            _agree(self, "keras_compat.stop_training.epoch")

        @functools.wraps(batch_end)
        def on_train_batch_end(self, batch, logs=None):
            batch_end(self, batch, logs)
            if any(getattr(c, PER_BATCH_ATTRIBUTE, False) for c in self.callbacks):
                _agree(self, "keras_compat.stop_training.batch")

        CallbackList.on_epoch_end = on_epoch_end
        CallbackList.on_train_batch_end = on_train_batch_end
        _installed = True


def _agree(callbacks, name: str) -> None:
    """One vote of every worker on `model.stop_training`; every worker sets the result."""
    model = getattr(callbacks, "model", None)
    if model is None or not detection.is_multi_worker(model.distribute_strategy):
        return
    from disttrain import coordination

    if coordination.get().any(bool(model.stop_training), name):
        model.stop_training = True
