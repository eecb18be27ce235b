"""CSVLogger that the chief alone commits, whole and atomically, to any fsspec URL."""

from __future__ import annotations

import csv
import io
import posixpath

import keras

from disttrain import storage
from disttrain.callbacks.base import DistributedCallback
from disttrain.errors import CallbackConfigError, StorageError


class CSVLogger(DistributedCallback, keras.callbacks.CSVLogger):
    """Streams epoch results to a CSV file at any fsspec URL, written by the chief only.

    Same arguments, meaning and file format as `keras.callbacks.CSVLogger`
    (an `epoch` column first, then the sorted log keys, same value formatting).
    Differences:

    - `filename` may be any fsspec URL (`gs://bucket/run/log.csv`,
      `memory://log.csv`, a local path).
    - Only the chief writes. It keeps the CSV content in memory and commits the
      whole file atomically at every epoch end (object stores cannot append),
      so a reader never sees a torn row. Non-chief workers write nothing.
    - Without `append`, a previous file stays in place until the first epoch
      end replaces it (Keras truncates it at train begin).
    - With `append=True`, the existing content is loaded at train begin and new
      rows continue it without a second header; if its header differs from the
      columns of this run, `CallbackConfigError` is raised at the first epoch
      end instead of writing rows under the wrong header (Keras appends them).
    - The file's directory is probed for writability at train begin, so an
      unwritable destination fails before the first epoch, not after it.
    - A failed read or write on the chief raises the same `StorageError` on
      every worker.
    - With `disttrain.callbacks.BackupAndRestore`, a resumed run continues the
      file where the backup was taken: rows of epochs after the backup (written
      before the failure, trained again after it) are dropped, so every epoch
      appears once (with `append=True`, which resuming needs to keep the rows
      before the failure at all).

    Each epoch rewrites the whole file, so the cost grows with the number of
    epochs (a few KB per hundred epochs for a handful of metrics).

    Args:
        filename: URL or local path of the CSV file, e.g. `"gs://bucket/run/log.csv"`.
        separator: string used to separate elements in the CSV file.
        append: True: continue an existing file (useful when resuming
            training). False: replace it.

    Example:

    ```python
    csv_logger = disttrain.callbacks.CSVLogger("gs://bucket/run/training.csv", append=True)
    model.fit(train, epochs=10, callbacks=[csv_logger])
    ```
    """

    def __init__(self, filename, separator: str = ",", append: bool = False):
        super().__init__(filename, separator=separator, append=append)
        self._existing_header: list[str] | None = None
        self._header_checked = False

    def on_train_begin(self, logs=None):
        self.writer = None
        self.keys = None
        self.csv_file = None
        self._existing_header = None
        self._header_checked = False
        self.coordinator.run_on_chief("CSVLogger.load", self._load, StorageError)

    def on_epoch_end(self, epoch, logs=None):
        def write_row():
            keras.callbacks.CSVLogger.on_epoch_end(self, epoch, logs)
            if not self._header_checked:
                self._header_checked = True
                mismatch = self._header_mismatch()
                if mismatch is not None:
                    raise mismatch
            self._commit()

        self.coordinator.run_on_chief("CSVLogger.write", write_row, StorageError)

    def backup_state(self):
        lines = self.csv_file.getvalue().count("\n") if self.csv_file is not None else 0
        return {"lines": lines}, []

    def restore_state(self, state, arrays):
        if self.csv_file is None:
            return
        kept = "".join(self.csv_file.getvalue().splitlines(keepends=True)[:state["lines"]])
        self.csv_file = io.StringIO(kept)
        self.csv_file.seek(0, io.SEEK_END)
        self.append_header = not kept

    def _load(self) -> None:
        storage.probe_writable(posixpath.dirname(self.filename) or ".")
        existing = ""
        if self.append and storage.exists(self.filename):
            existing = storage.read_bytes(self.filename).decode("utf-8")
        self.append_header = not existing
        if existing:
            self._existing_header = next(csv.reader(io.StringIO(existing), delimiter=self.sep))
        self.csv_file = io.StringIO(existing)
        self.csv_file.seek(0, io.SEEK_END)

    def _header_mismatch(self) -> CallbackConfigError | None:
        columns = ["epoch"] + (self.keys or [])
        if self._existing_header is None or self._existing_header == columns:
            return None
        return CallbackConfigError(
            f"CSVLogger(append=True): {self.filename!r} has the columns "
            f"{self._existing_header} but this run logs {columns}; appending would put "
            "rows under the wrong header. Fix: log the same metrics as the earlier run, "
            "pass append=False to start the file afresh, or use another filename."
        )

    def _commit(self) -> None:
        storage.atomic_write_bytes(self.filename, self.csv_file.getvalue().encode("utf-8"))
