"""EarlyStopping whose decision and best epoch are the chief's on every worker; one metric
or several."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from disttrain.callbacks.base import DistributedCallback
from disttrain.errors import CallbackConfigError
from disttrain.keras_compat import stop_agreement


class EarlyStopping(DistributedCallback, keras.callbacks.EarlyStopping):
    """Stops training when monitored metrics have stopped improving, on every worker.

    Same arguments and meaning as `keras.callbacks.EarlyStopping`, plus `strict`
    and several metrics. Differences, all on the safe side:

    - The decision is agreed at every epoch end: every worker takes the chief's
      state (best value, best epoch, epochs waited) and the chief's decision to
      stop, so all stop after the same epoch and `restore_best_weights` restores
      the same epoch everywhere, even in a custom training loop where each
      worker passes its own, unreduced logs (then "best" is judged on the
      chief's logs: reduce metrics across workers to judge on all the data,
      see `docs/custom_loops.md`). In a multi-worker `fit` the logs are already
      identical, and the agreement travels in the one exchange that ends each
      epoch (`disttrain.keras_compat.stop_agreement`), costing no exchange of
      its own.
    - `restore_best_weights` defaults to `True`: the best weights are restored
      on every worker at train end, whether or not training stopped early.
    - `monitor` may be a list of metrics (keras-team/keras#21001): an epoch
      improves when at least one metric improves on its own best by its own
      `min_delta`, and training stops when none has improved for `patience`
      epochs. `mode`, `min_delta` and `baseline` are then one value for all or
      a list with one value per metric. The best epoch (restored with
      `restore_best_weights`) is the last epoch that improved any metric;
      `best` is the list of each metric's best value. With `baseline`, the
      epochs waited restart only when an improving metric also beats its
      baseline.
    - A monitor missing from the logs raises `CallbackConfigError` listing the
      available metrics (`strict=False` keeps Keras's warning); a metric holding
      several values (per-class scores) is refused.
    - Monitoring a training metric (`loss`, `accuracy`...) while its validation
      counterpart exists warns once, on the chief.
    - It works in custom training loops that drive callbacks through
      `keras.callbacks.CallbackList(..., model=model)` and never set
      `model.stop_training`.

    Args:
        monitor: quantity to monitor, or a list of quantities.
        min_delta: minimum change that counts as an improvement (a list: per metric).
        patience: epochs without improvement before stopping.
        verbose: 0 or 1 (messages on the chief).
        mode: `"auto"`, `"min"` or `"max"` (a list: per metric).
        baseline: value the monitor must beat (a list: per metric, `None` for none).
        restore_best_weights: restore the best epoch's weights at train end.
        start_from_epoch: epochs to wait before monitoring improvement.
        strict: raise on a missing monitor (default) instead of warning.

    Example:

    ```python
    stop = disttrain.callbacks.EarlyStopping(monitor="val_loss", patience=3)
    model.fit(train, validation_data=val, epochs=100, callbacks=[stop])

    # Stop when neither the loss nor the AUC improved for 5 epochs.
    stop = disttrain.callbacks.EarlyStopping(
        monitor=["val_loss", "val_auc"], mode=["min", "max"], min_delta=[1e-3, 1e-4],
        patience=5)
    ```
    """

    def __init__(
        self,
        monitor: str | Sequence[str] = "val_loss",
        min_delta: float | Sequence[float] = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str | Sequence[str] = "auto",
        baseline: float | None | Sequence[float | None] = None,
        restore_best_weights: bool = True,
        start_from_epoch: int = 0,
        strict: bool = True,
    ):
        metrics = _monitors(monitor)
        self._watchers: list[keras.callbacks.EarlyStopping] | None = None
        if metrics is not None:
            modes = _per_metric(mode, "mode", metrics)
            deltas = _per_metric(min_delta, "min_delta", metrics)
            baselines = _per_metric(baseline, "baseline", metrics)
            # One Keras EarlyStopping per metric judges that metric's improvement (its
            # monitor_op and signed min_delta; Keras 3.10 has no MonitorCallback yet).
            self._watchers = [keras.callbacks.EarlyStopping(m, min_delta=d, mode=mo)
                              for m, mo, d in zip(metrics, modes, deltas)]
            self._baselines = baselines
        else:
            for name, value in (("min_delta", min_delta), ("mode", mode),
                                ("baseline", baseline)):
                if isinstance(value, (list, tuple)):
                    raise CallbackConfigError(
                        f"EarlyStopping(monitor={monitor!r}, {name}={value!r}): a list of "
                        f"{name} values needs a list of monitors. Fix: pass one {name}, or "
                        "monitor=[...] with one entry per value.")
        single = metrics is None
        super().__init__(
            monitor=monitor if single else metrics[0],
            min_delta=min_delta if single else 0, patience=patience,
            verbose=verbose if self.is_chief else 0, mode=mode if single else "auto",
            baseline=baseline if single else None,
            restore_best_weights=restore_best_weights, start_from_epoch=start_from_epoch,
        )
        if not single:
            self.monitor, self.mode, self.min_delta = list(metrics), list(modes), list(deltas)
            self.baseline = list(baselines)
        self.strict = strict

    def get_monitor_value(self, logs):
        self.warn_if_training_metric(logs, self.monitor)
        return self.monitored(logs, self.monitor)

    def backup_state(self):
        state = {"wait": self.wait, "best": _plain(self.best),
                 "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}
        return state, list(self.best_weights or [])

    def restore_state(self, state, arrays):
        self.wait = state["wait"]
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.stopped_epoch = state["stopped_epoch"]
        self.best_weights = list(arrays) or None

    def on_epoch_end(self, epoch, logs=None):
        stopping_before = stop_agreement.stop_requested(self.model)
        weights_before = self.best_weights
        if self._watchers is None:
            super().on_epoch_end(epoch, logs)
        else:
            self._on_epoch_end_of_metrics(epoch, logs)
        decided = stop_agreement.stop_requested(self.model) and not stopping_before
        if decided:  # the chief's decision counts; settle sets it on every worker
            self.model.stop_training = stopping_before
        mine = {"stop": decided, "wait": self.wait, "best": _plain(self.best),
                "best_epoch": self.best_epoch}

        def settle(per_worker: list[dict[str, Any]]) -> None:
            chief = per_worker[0]
            if chief["best"] != mine["best"]:
                self.best = chief["best"]
            self.wait = chief["wait"]
            best_now = chief["best_epoch"] == epoch and self.restore_best_weights
            if best_now and self.best_weights is weights_before:
                self.best_weights = self.model.get_weights()
            elif not best_now and self.best_weights is not weights_before:
                self.best_weights = weights_before
            self.best_epoch = chief["best_epoch"]
            if chief["stop"]:
                self.model.stop_training = True
                self.stopped_epoch = epoch

        self.settle_across_workers("stop", mine, settle)

    def _on_epoch_end_of_metrics(self, epoch: int, logs) -> None:
        """Keras's `on_epoch_end` for several metrics: improving means any metric improves."""
        watchers = self._watchers
        for watcher in watchers:
            if watcher.monitor_op is None:
                watcher.set_model(self.model)
                try:
                    watcher._set_monitor_op()  # private: keras EarlyStopping
                except ValueError as e:
                    raise CallbackConfigError(
                        f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}): cannot "
                        f"tell whether {watcher.monitor!r} should be minimized or maximized. "
                        "Fix: pass mode=[...] with 'min' or 'max' for each metric.") from e
        for name in self.monitor:
            self.warn_if_training_metric(logs, name)
        values = [self.monitored(logs, name) for name in self.monitor]
        if any(v is None for v in values) or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()
            self.best_epoch = epoch
        self.wait += 1
        best = self.best or [None] * len(values)
        # private: keras EarlyStopping._is_improvement
        improved = [bool(w._is_improvement(v, b)) for w, v, b in zip(watchers, values, best)]
        if any(improved):
            self.best = [v if i else b for v, b, i in zip(values, best, improved)]
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if any(i and (base is None or bool(w._is_improvement(v, base)))
                   for w, v, base, i in zip(watchers, values, self._baselines, improved)):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True


def _monitors(monitor: str | Sequence[str]) -> list[str] | None:
    """The metric names of a list `monitor` (None for one name as a string)."""
    if isinstance(monitor, str):
        return None
    names = list(monitor) if isinstance(monitor, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise CallbackConfigError(
            f"EarlyStopping(monitor={monitor!r}): must be a metric name or a non-empty list "
            "of distinct metric names. Fix: pass e.g. monitor=['val_loss', 'val_auc'].")
    return names


def _per_metric(value: Any, name: str, metrics: list[str]) -> list[Any]:
    """`value` for each metric: one value repeated, or a list with one entry per metric."""
    if not isinstance(value, (list, tuple)):
        return [value] * len(metrics)
    if len(value) != len(metrics):
        raise CallbackConfigError(
            f"EarlyStopping(monitor={metrics!r}, {name}={list(value)!r}): {len(value)} values "
            f"for {len(metrics)} metrics. Fix: pass one {name} for all, or one per metric.")
    return list(value)


def _plain(best: Any) -> Any:
    """`best` as JSON: a float, a list of floats (several metrics) or None."""
    if best is None:
        return None
    if isinstance(best, list):
        return [_plain(b) for b in best]
    return float(np.asarray(best).reshape(()))
