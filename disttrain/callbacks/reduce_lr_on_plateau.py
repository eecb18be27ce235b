"""ReduceLROnPlateau whose learning rate is the chief's on every worker."""

from __future__ import annotations

import keras

from disttrain.callbacks.base import DistributedCallback


class ReduceLROnPlateau(DistributedCallback, keras.callbacks.ReduceLROnPlateau):
    """Reduces the learning rate when a metric has stopped improving, on every worker.

    Same arguments and meaning as `keras.callbacks.ReduceLROnPlateau`, plus
    `strict`. Keras's own logic decides at each epoch end; then the chief's
    resulting learning rate is broadcast and set on every worker, so the
    learning rate is identical everywhere after a reduction, and so is the
    callback's state (best value, epochs waited, cooldown): in a custom training
    loop where each worker passes its own, unreduced logs, the chief's logs decide.
    Differences:

    - The chief's learning rates travel in the one exchange that ends each
      epoch of a multi-worker `fit` (`disttrain.keras_compat.stop_agreement`)
      and are set on every worker after all callbacks' `on_epoch_end`: no
      exchange of its own (called outside `fit`, one exchange). A callback
      later in the same epoch end may still read this worker's own rate.
      Every worker must use this callback.
    - A monitor missing from the logs raises `CallbackConfigError` listing the
      available metrics (`strict=False` keeps Keras's warning). With
      `validation_freq > 1` and a `val_` monitor, pass `strict=False`: epochs
      without validation lack the metric.
    - `verbose` messages are printed by the chief only.
    - As in Keras, an optimizer whose learning rate is a `LearningRateSchedule`
      raises `TypeError` when a reduction is due (the schedule already gives
      every worker the same rate, so the broadcast never sets it).

    Args:
        monitor: quantity to monitor.
        factor: factor the learning rate is multiplied by, `new_lr = lr * factor`.
        patience: epochs with no improvement after which the rate is reduced.
        verbose: 0 (quiet) or 1 (a message on the chief at each reduction).
        mode: `"auto"`, `"min"` or `"max"`: whether the monitor should decrease or
            increase (`"auto"` infers it from the metric).
        min_delta: threshold for a significant change of the monitor.
        cooldown: epochs to wait after a reduction before resuming normal operation.
        min_lr: lower bound on the learning rate.
        strict: raise on a missing monitor (default) instead of warning.
        **kwargs: accepted and ignored, as in Keras.

    Example:

    ```python
    reduce_lr = disttrain.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.2, patience=5, min_lr=0.001)
    model.fit(train, validation_data=val, epochs=50, callbacks=[reduce_lr])
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        strict: bool = True,
        **kwargs,
    ):
        super().__init__(
            monitor=monitor, factor=factor, patience=patience,
            verbose=verbose if self.is_chief else 0, mode=mode, min_delta=min_delta,
            cooldown=cooldown, min_lr=min_lr, **kwargs,
        )
        self.strict = strict

    def backup_state(self):
        best = None if self.best is None else self._as_scalar(self.best, self.monitor)
        return {"wait": self.wait, "cooldown_counter": self.cooldown_counter, "best": best}, []

    def restore_state(self, state, arrays):
        self.wait = state["wait"]
        self.cooldown_counter = state["cooldown_counter"]
        self.best = state["best"]

    def on_epoch_end(self, epoch, logs=None):
        if self.strict:
            self.monitored(logs, self.monitor)
        super().on_epoch_end(epoch, logs)
        local = [float(keras.ops.convert_to_numpy(o.learning_rate)) for o in self._optimizers()]
        state = self.backup_state()[0]

        def settle(per_worker: list[dict]) -> None:
            chief = per_worker[0]
            self._set_learning_rates(chief["lr"])
            if chief["state"] != state:
                self.restore_state(chief["state"], [])

        self.settle_across_workers("lr", {"lr": local, "state": state}, settle)

    def _optimizers(self) -> list:
        optimizer = self.model.optimizer
        return list(getattr(optimizer, "optimizers", [optimizer]))

    def _set_learning_rates(self, chief: list[float]) -> None:
        """Sets the chief's learning rates where this worker's differ."""
        for optimizer, theirs in zip(self._optimizers(), chief, strict=True):
            if float(keras.ops.convert_to_numpy(optimizer.learning_rate)) != theirs:
                optimizer.learning_rate = theirs
