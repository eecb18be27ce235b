"""EarlyStopping whose stop decision is voted across workers."""

from __future__ import annotations

import keras

from disttrain.callbacks.base import DistributedCallback


class EarlyStopping(DistributedCallback, keras.callbacks.EarlyStopping):
    """Stops training when a monitored metric has stopped improving, on every worker.

    Same arguments and meaning as `keras.callbacks.EarlyStopping`, plus `strict`.
    Differences, all on the safe side:

    - The stop decision is voted at every epoch end: if any worker decides to
      stop, all stop after the same epoch, so no worker is left blocked in a
      collective. In a multi-worker `fit` the vote travels in the one exchange
      that ends each epoch (`disttrain.keras_compat.stop_agreement`), after
      every callback's `on_epoch_end`, so it costs no exchange of its own.
    - `restore_best_weights` defaults to `True`: the best weights are restored
      on every worker at train end, whether or not training stopped early.
    - A monitor missing from the logs raises `CallbackConfigError` listing the
      available metrics (`strict=False` keeps Keras's warning).
    - Monitoring a training metric (`loss`, `accuracy`...) while its validation
      counterpart exists warns once.

    Args:
        monitor: quantity to monitor.
        min_delta: minimum change that counts as an improvement.
        patience: epochs without improvement before stopping.
        verbose: 0 or 1 (messages on the chief).
        mode: `"auto"`, `"min"` or `"max"`.
        baseline: value the monitor must beat.
        restore_best_weights: restore the best epoch's weights at train end.
        start_from_epoch: epochs to wait before monitoring improvement.
        strict: raise on a missing monitor (default) instead of warning.

    Example:

    ```python
    stop = disttrain.callbacks.EarlyStopping(monitor="val_loss", patience=3)
    model.fit(train, validation_data=val, epochs=100, callbacks=[stop])
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = True,
        start_from_epoch: int = 0,
        strict: bool = True,
    ):
        super().__init__(
            monitor=monitor, min_delta=min_delta, patience=patience,
            verbose=verbose if self.is_chief else 0, mode=mode,
            baseline=baseline, restore_best_weights=restore_best_weights,
            start_from_epoch=start_from_epoch,
        )
        self.strict = strict

    def get_monitor_value(self, logs):
        self.warn_if_training_metric(logs, self.monitor)
        return self.monitored(logs, self.monitor)

    def backup_state(self):
        state = {"wait": self.wait, "best": None if self.best is None else float(self.best),
                 "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}
        return state, list(self.best_weights or [])

    def restore_state(self, state, arrays):
        self.wait = state["wait"]
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.stopped_epoch = state["stopped_epoch"]
        self.best_weights = list(arrays) or None

    def on_epoch_end(self, epoch, logs=None):
        already_stopping = bool(self.model.stop_training)
        super().on_epoch_end(epoch, logs)
        decided = bool(self.model.stop_training) and not already_stopping

        def settle(decisions: list) -> None:
            if any(decisions):
                self.model.stop_training = True
                self.stopped_epoch = epoch

        self.settle_across_workers("stop", decided, settle)
