"""TerminateOnNaN that stops every worker after the same batch, without a vote when it can."""

from __future__ import annotations

import keras

from disttrain import keras_compat
from disttrain.callbacks.base import DistributedCallback, is_nan_or_inf
from disttrain.keras_compat import scalar_metric_reduction


class TerminateOnNaN(DistributedCallback, keras.callbacks.TerminateOnNaN):
    """Terminates training on a NaN or Inf loss, on every worker after the same batch.

    Same argument and meaning as `keras.callbacks.TerminateOnNaN`. Under
    `disttrain.strategy()` the loss in a batch's logs is already the mean over
    every replica of every worker (`disttrain.keras_compat`'s
    `scalar_metric_reduction`), computed by one all-reduce whose result every
    worker receives bit for bit. A NaN or Inf on any worker makes that mean
    NaN or Inf everywhere, so every worker takes the same decision after the
    same batch with no exchange at all. Only where that reduction is not in
    place (skipped with `disttrain.keras_compat.apply(skip=...)`) do the
    workers exchange their loss at every batch end and act on the first NaN
    or Inf reported. With `raise_error=True` every worker raises the same
    `RuntimeError`.

    Differs from Keras: none in behaviour. A callback listed before this one
    that rewrites `logs["loss"]` on some workers only makes them decide
    differently; stop from such a callback with `model.stop_training` and
    `disttrain.callbacks.SyncStop(per_batch=True)` instead.

    Cost: what Keras's own `TerminateOnNaN` costs: reading the loss at every
    batch, which also turns off Keras's asynchronous batch-callback dispatch
    (docs/callbacks.md gives a measurement). Every worker must use this callback.

    Args:
        raise_error: False (default) stops training gracefully by setting
            `model.stop_training = True`; True raises `RuntimeError` at once,
            skipping the other callbacks' `on_train_end`.

    Example:

    ```python
    model.fit(train, epochs=10, callbacks=[disttrain.callbacks.TerminateOnNaN()])
    ```
    """

    def on_batch_end(self, batch, logs=None):
        if self.coordinator.num_workers == 1 or _losses_reduced_across_workers():
            super().on_batch_end(batch, logs)
            return
        loss = (logs or {}).get("loss")
        reported = self.coordinator.gather(
            "TerminateOnNaN.loss", "" if loss is None else str(loss)
        )
        invalid = [value for value in reported if is_nan_or_inf(value)]
        super().on_batch_end(batch, {"loss": float(invalid[0])} if invalid else logs)


def _losses_reduced_across_workers() -> bool:
    """Whether every worker's batch logs hold the same all-reduced loss."""
    return scalar_metric_reduction.NAME in keras_compat.applied()
