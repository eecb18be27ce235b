"""What every disttrain callback shares: cluster facts, the vote, monitor checks.

Callbacks mix `DistributedCallback` into the Keras callback they extend, so none
of them re-implements the chief check, the run id or the cross-worker vote.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from disttrain import coordination, storage
from disttrain.cluster import ENV_RESULT_FILE
from disttrain.errors import CallbackConfigError
from disttrain.keras_compat import stop_agreement


class DistributedCallback:
    """Mixin giving a Keras callback the cluster it runs on.

    Attributes:
        strict: when True (disttrain's default), a monitored metric missing from
            the logs raises `CallbackConfigError` listing the available metrics;
            when False, Keras's warn-and-skip behaviour is kept.
    """

    strict: bool = True

    def set_model(self, model) -> None:
        super().set_model(model)
        attached = _attached.setdefault(model, [])
        if self not in attached:
            attached.append(self)

    def backup_state(self) -> tuple[dict[str, Any], list[Any]] | None:
        """State to persist across a restart: (JSON-able dict, list of numpy arrays).

        `None` (the default) means the callback has nothing to persist.
        `BackupAndRestore` saves it with the model and hands it back through
        `restore_state` when training resumes.
        """
        return None

    def restore_state(self, state: dict[str, Any], arrays: list[Any]) -> None:
        """Restores what `backup_state` returned, on every worker."""

    def agreement_key(self, what: str) -> str:
        """A name for this callback's value in a cross-worker exchange, the same on every
        worker: its class, its place among the model's callbacks of that class, `what`
        (e.g. `"EarlyStopping-1.stop"`)."""
        same = [c for c in attached_callbacks(self.model) if type(c) is type(self)]
        place = next((i for i, c in enumerate(same) if c is self), len(same)) + 1
        return f"{type(self).__name__}-{place}.{what}"

    def settle_across_workers(self, what: str, value: Any,
                              settle: Callable[[list[Any]], None]) -> None:
        """Calls `settle` on every worker with every worker's `value` (rank order).

        Inside the epoch end of a multi-worker `fit` the value travels in the one
        exchange that ends the epoch (`keras_compat.stop_agreement.defer`), and
        `settle` runs after every callback's `on_epoch_end`; elsewhere the workers
        exchange it at once. In one process `settle([value])` runs at once.

        Args:
            what: names the value within this callback (e.g. `"stop"`).
            value: JSON-serializable.
            settle: called with every worker's value.
        """
        key = self.agreement_key(what)
        if self.coordinator.num_workers == 1:
            settle([value])
        elif not stop_agreement.defer(self.model, key, value, settle):
            settle([json.loads(v) for v in self.coordinator.gather(key, json.dumps(value))])

    @property
    def coordinator(self) -> coordination.Coordinator:
        return coordination.get()

    @property
    def is_chief(self) -> bool:
        return self.coordinator.is_chief

    @property
    def run_id(self) -> str:
        return self.coordinator.run_id()

    def monitored(self, logs: Mapping[str, Any] | None, monitor: str) -> float | None:
        """The value of `monitor` in `logs`, or None (strict=False) when absent.

        Raises:
            CallbackConfigError: `monitor` is not in `logs` and `strict` is True.
        """
        logs = logs or {}
        value = logs.get(monitor)
        if value is not None:
            return self._as_scalar(value, monitor)
        name = type(self).__name__
        available = ", ".join(sorted(logs)) or "(none)"
        hint = ""
        if monitor.startswith("val_") and not any(k.startswith("val_") for k in logs):
            hint = (" This epoch's logs hold no validation metrics: pass validation_data to "
                    "fit(); with fit(validation_freq=k > 1), epochs without validation lack "
                    "them, so pass strict=False.")
        message = (
            f"{name}(monitor={monitor!r}): {monitor!r} is not in the logs. "
            f"Available: {available}.{hint} Fix: monitor one of the available metrics "
            "(names come from compile(metrics=...)), or pass strict=False to warn and skip."
        )
        if self.strict:
            raise CallbackConfigError(message)
        self.warn_on_chief(message, stacklevel=4)
        return None

    def _as_scalar(self, value: Any, monitor: str) -> float:
        """`value` as a float: a scalar, or an array holding one value (a metric
        such as `F1Score` on one class logs shape `(1,)`, which Keras compares as
        is).

        Raises:
            CallbackConfigError: the array holds several values (per-class
                metrics): no single best exists to compare.
        """
        array = np.asarray(value)
        if array.size != 1:
            raise CallbackConfigError(
                f"{type(self).__name__}(monitor={monitor!r}): the metric holds "
                f"{array.size} values (shape {array.shape}), not one, so there is no single "
                "value to compare between epochs. Fix: monitor a scalar metric, e.g. "
                "F1Score(average='macro') instead of per-class scores."
            )
        return float(array.reshape(()))

    def warn_if_training_metric(self, logs: Mapping[str, Any] | None, monitor: str) -> None:
        """Warns once per monitor (on the chief) when a training metric is monitored while
        validation ones exist."""
        warned = self.__dict__.setdefault("_warned_training_metric", set())
        if monitor in warned:
            return
        warned.add(monitor)
        logs = logs or {}
        if not monitor.startswith("val_") and f"val_{monitor}" in logs:
            self.warn_on_chief(
                f"{type(self).__name__} monitors the training metric {monitor!r} although "
                f"'val_{monitor}' exists; decisions then follow training fit, not "
                f"generalisation. Pass monitor='val_{monitor}' unless this is intended.",
                stacklevel=4,
            )

    def warn_on_chief(self, message: str, stacklevel: int = 3) -> None:
        """Warns about the user's configuration once for the cluster: on the chief only
        (every worker runs the same callbacks with the same configuration)."""
        if self.is_chief:
            warnings.warn(message, stacklevel=stacklevel)


def add_to_result(fields: Mapping[str, Any]) -> None:
    """Chief: merges `fields` into the JSON result a launcher shows in its summary
    (the file `DISTTRAIN_RESULT_FILE` names; nothing when it is unset), so callbacks
    can each add theirs in any order."""
    url = os.environ.get(ENV_RESULT_FILE)
    if not url:
        return
    existing = storage.read_json(url) if storage.exists(url) else None
    storage.write_json(url, {**(existing if isinstance(existing, dict) else {}), **fields})


_attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attached_callbacks(model) -> list[DistributedCallback]:
    """The disttrain callbacks attached to `model`, in the order they were attached."""
    return list(_attached.get(model, ()))


def is_nan_or_inf(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
