"""TrainingReport: the chief records each epoch's time and draws the run's figure at the end."""

from __future__ import annotations

import os
import secrets
import time

import keras

from disttrain import storage
from disttrain.callbacks.base import DistributedCallback, add_to_result
from disttrain.cluster import ENV_ATTEMPT
from disttrain.errors import CallbackConfigError, StorageError
from disttrain.report import history, run_files

_PROCESS = secrets.token_hex(6)
"""Tells this process's epochs from those of an earlier process (a restart)."""


class TrainingReport(DistributedCallback, keras.callbacks.Callback):
    """Writes `history.json` every epoch and `history.png` at the end of `fit`, chief only.

    Not a Keras callback's namesake: it completes `CSVLogger`, which must write
    `history.csv` into the same `directory` (`recommended()` puts both there, in
    this order). `history.json` says how long each epoch took and which process
    trained it, so restarts show; at the end of `fit` the chief reads both files
    and draws the curves with `disttrain.report` (loss and each metric, training
    and validation, LR changes, restarts, the best `monitor` epoch), commits
    `history.png` atomically to any fsspec URL, and adds `figure` to the result a
    launcher shows. `python -m disttrain.report DIRECTORY` draws it again.

    Without matplotlib the chief prints a one-line notice and training goes on.
    A write failure on the chief raises the same `StorageError` on every worker.

    Args:
        directory: the run directory holding `history.csv` (any fsspec URL).
        monitor: the metric whose best epoch is marked.
        mode: `"auto"`, `"min"` or `"max"` for `monitor`.

    Example:

    ```python
    model.fit(train, validation_data=val, epochs=10, callbacks=[
        disttrain.callbacks.CSVLogger("gs://bucket/run/history.csv", append=True),
        disttrain.callbacks.TrainingReport("gs://bucket/run"),
    ])
    ```
    """

    def __init__(self, directory: str, monitor: str = "val_loss", mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise CallbackConfigError(
                f"TrainingReport(mode={mode!r}) is not a mode. Fix: use 'auto', 'min' or 'max'.")
        self.directory = directory
        self.monitor = monitor
        self.mode = history.better_mode(monitor) if mode == "auto" else mode
        self._url = storage.join(directory, run_files.HISTORY_TIMES)
        self._times: dict = {}
        self._began = 0.0
        self._starting = False

    def on_train_begin(self, logs=None):
        self._starting = True

        def load() -> None:
            self._times = storage.read_json(self._url) or {}

        self.coordinator.run_on_chief("TrainingReport.load", load, StorageError)

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.monotonic()
        if self._starting:
            self._starting = False
            self._times.setdefault("starts", []).append(
                {"epoch": epoch + 1, "process": _PROCESS,
                 "attempt": os.environ.get(ENV_ATTEMPT, "0"), "time": time.time()})

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.monotonic() - self._began

        def write() -> None:
            self._times.update(monitor=self.monitor, mode=self.mode)
            self._times.setdefault("epochs", {})[str(epoch + 1)] = {
                "seconds": round(seconds, 4), "ended": time.time()}
            storage.write_json(self._url, self._times)

        self.coordinator.run_on_chief("TrainingReport.epoch", write, StorageError)

    def on_train_end(self, logs=None):
        def draw() -> None:
            url = history.write_figure(history.read_run(self.directory))
            if url is not None:
                add_to_result({"figure": url})

        self.coordinator.run_on_chief("TrainingReport.figure", draw, StorageError)
