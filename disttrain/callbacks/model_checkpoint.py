"""ModelCheckpoint: chief-only, atomic saves to any fsspec URL, via `storage.CheckpointManager`."""

from __future__ import annotations

import os
import posixpath
import re
import time
from typing import Any

import keras
from keras import ops
from keras.src.utils import io_utils  # private: keras.src

from disttrain import keras_compat, storage
from disttrain.callbacks.base import DistributedCallback, add_to_result, attached_callbacks
from disttrain.errors import CallbackConfigError, StorageError
from disttrain.report import run_files
from disttrain.storage.snapshot import ModelSnapshot

_DIRECTORY_FIX = ("move the other fields into the file name, so every checkpoint of a run "
                  "has one manifest")


class ModelCheckpoint(DistributedCallback, keras.callbacks.ModelCheckpoint):
    """Saves the model (or its weights) at some frequency, safely on N workers.

    Same arguments and meaning as `keras.callbacks.ModelCheckpoint`, plus
    `max_to_keep`, `strict` and `overwrite`. Differences, all on the safe side:

    - Only the chief writes; the save decision is the chief's and is followed by
      every worker, and non-chief workers write nothing anywhere. Every worker
      keeps the chief's record and best value, so `best_checkpoint()` is the
      same everywhere, also in a custom training loop whose logs differ per
      worker (`docs/custom_loops.md`).
    - Every file is committed atomically (local: temp file in the same directory,
      fsync, `os.replace`; object stores: one whole-object upload), so a crash
      leaves the previous checkpoint or the new one, never a torn file.
    - `filepath` is any fsspec URL (local path, `file://`, `gs://`, `s3://`,
      `memory://`). Besides `{epoch}`, `{batch}` and log keys with format specs
      (`{val_loss:.4f}`) it accepts `{run_id}`, identical on every worker. The
      directory part may only use `{run_id}`.
    - After each save a manifest `best.json` is written in the checkpoint
      directory: the best checkpoint (path, epoch, monitor value, run id) and the
      checkpoints kept. When ModelCheckpoints with different file names write to
      one directory (a "best" and a "last" one, or two monitors), each keeps its
      own manifest, `best.<file name>.json` (`manifest_name`; `last.keras` ->
      `best.last.keras.json`), so each tells the truth; pass it to
      `disttrain.SidecarEvaluator(manifest=...)`. The manifest is the commit
      point: files dropped by `max_to_keep` are deleted only after it, so it
      never names a missing file. Readers should trust it rather than list
      files. When `fit` ends normally the chief adds a "training finished" mark to it (`storage.training_finished`),
      which tells `disttrain.SidecarEvaluator` that no checkpoint will follow.
    - A write failure on the chief (permissions, disk full, credentials) raises
      the same `StorageError` on every worker instead of hanging them.
    - At train begin the destination is probed for writability, and a directory
      holding the manifest of a different run is refused (pass `overwrite=True`
      or put `{run_id}` in the path); a file this run did not write is never
      replaced unless `overwrite=True`. When the manifest belongs to this same
      run and was written by an earlier process (a restarted attempt), its best
      value is restored, so a restart never replaces a better checkpoint with a
      worse one. A new `ModelCheckpoint` in a later `fit` of the same process
      starts with no best value, as Keras's does.
    - A monitor missing from the logs (with `save_best_only`) or a template key
      missing from the logs raises `CallbackConfigError` listing the available
      metrics, instead of Keras's warn-and-save (`strict=False` restores that).

    Args:
        filepath: destination URL template ending in `.keras` (or `.weights.h5`
            with `save_weights_only=True`).
        monitor: metric name to monitor.
        verbose: 0 (silent) or 1 (messages on the chief when saving).
        save_best_only: only save when `monitor` improves.
        save_weights_only: save weights only (`.weights.h5`).
        mode: `"auto"`, `"min"` or `"max"`.
        save_freq: `"epoch"` or an integer number of batches.
        initial_value_threshold: initial best value of `monitor`.
        max_to_keep: keep at most this many checkpoints: the best ones when
            `save_best_only`, else the latest ones. `None` keeps all.
        retention: a `storage.Retention` policy instead of `max_to_keep`, e.g.
            `Retention(best=3, every_epochs=10)`: the best 3 by `monitor` and
            every 10th epoch's (also `every_steps`, `every_hours`, `latest`).
        strict: raise on missing metrics (default) instead of warning.
        overwrite: allow replacing files of other runs in the destination.
        async_commit: snapshot, then write: return to training once the model's
            state (weights and optimizer variables, config, assets) is copied to
            host memory (`storage.snapshot.ModelSnapshot`), and serialize the
            file from that snapshot and commit it (fsync and rename, or the upload
            to an object store, then the manifest and deletions) in a background
            thread. The file is the one a synchronous save of the same step
            writes. Host memory: one more copy of the saved state while a save is
            in flight; at most one is: a save asked while the previous one is
            still in flight waits for it first. Guarantees are unchanged: each
            file appears atomically and a crash leaves the previous checkpoint.
            What changes: a checkpoint is committed (visible to readers) a little
            after `on_epoch_end` returns rather than before, and a failure of its
            serialization or commit is raised on every worker, with the chief's
            message, at the next save or at the end of `fit`. `fit` returns only
            after the last commit; a process that ends otherwise (an exception,
            `disttrain.Preempted`) still finishes it before the interpreter exits.
            Default False: the file is committed when the callback returns, as in
            Keras (see `docs/checkpoints.md` for when to turn it on).

    Example:

    ```python
    ckpt = disttrain.callbacks.ModelCheckpoint(
        "gs://bucket/{run_id}/ckpt-{epoch:03d}-{val_loss:.4f}.keras",
        monitor="val_loss", save_best_only=True, max_to_keep=3)
    model.fit(train, validation_data=val, epochs=50, callbacks=[ckpt])
    ```
    """

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        max_to_keep: int | None = None,
        strict: bool = True,
        overwrite: bool = False,
        async_commit: bool = False,
        retention: storage.Retention | None = None,
    ):
        filepath = os.fspath(filepath)
        super().__init__(
            filepath, monitor=monitor, verbose=verbose, save_best_only=save_best_only,
            save_weights_only=save_weights_only, mode=mode, save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        if isinstance(save_freq, int) and (isinstance(save_freq, bool) or save_freq < 1):
            raise CallbackConfigError(
                f"ModelCheckpoint(save_freq={save_freq!r}): must be 'epoch' or a positive "
                "number of batches. Fix: pass e.g. save_freq=100."
            )
        storage.check_max_to_keep(max_to_keep, "ModelCheckpoint")
        self.max_to_keep = max_to_keep
        self.retention = retention
        self.strict = strict
        self.overwrite = overwrite
        self.async_commit = bool(async_commit)
        owner = f"ModelCheckpoint(filepath={filepath!r})"
        self._fields = storage.template_fields(filepath, owner, int_fields=("epoch", "batch"))
        self._directory_template = posixpath.dirname(filepath) or "."
        storage.check_run_id_only(self._directory_template, owner, _DIRECTORY_FIX)
        self.directory: str | None = None
        self._manager: storage.CheckpointManager | None = None
        self._checked_keys = False

    @property
    def manifest_url(self) -> str:
        return storage.join(self.directory or self._directory_template, self.manifest_name)

    @property
    def manifest_name(self) -> str:
        """The name of this checkpoint's commit record in its directory: `best.json`, or
        `best.<file name>.json` when ModelCheckpoints with other file names write to the
        same directory (e.g. "best" and "last"), so each record tells the truth."""
        others = {c.filepath for c in attached_callbacks(self.model) if
                  isinstance(c, ModelCheckpoint) and c._directory_template ==
                  self._directory_template} if self.model is not None else set()
        if others <= {self.filepath}:
            return run_files.BEST_CHECKPOINT
        return _manifest_name(self.filepath)

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """The records (path, epoch, value...) of the kept checkpoints, same on every worker."""
        return self._manager.checkpoints if self._manager is not None else []

    def on_train_begin(self, logs=None):
        self.directory = storage.expand_run_id(
            self._directory_template, self.run_id, f"ModelCheckpoint(filepath={self.filepath!r})",
            _DIRECTORY_FIX)
        name = self.manifest_name
        self._check_manifest_names(name)
        previous, self._manager = self._manager, storage.CheckpointManager(
            self.directory, self.run_id, max_to_keep=self.max_to_keep,
            keep_best=self.save_best_only, index_name=name, overwrite=self.overwrite,
            async_commit=self.async_commit, owner="ModelCheckpoint", retention=self.retention,
            pending_name=(storage.PENDING_NAME if name == run_files.BEST_CHECKPOINT
                          else f".{name}.pending"))

        def preflight() -> dict[str, Any]:
            """Chief: checks the destination; this run's saved state, if resuming."""
            if previous is not None:
                previous.wait()
            manifest = self._manager.open()
            # A restart resumes the run's best; a new callback in a later fit of this
            # process starts from none, as Keras's does (its files stay this run's).
            fresh = previous is None and self._manager.written_by_this_process(manifest)
            return {"best": None if fresh else manifest.get("best_value"),
                    "checkpoints": manifest.get("checkpoints", [])}

        shared = self.coordinator.run_on_chief("ModelCheckpoint.preflight", preflight,
                                               StorageError)
        self._manager.checkpoints = shared["checkpoints"]
        if shared["best"] is not None and self.save_best_only:
            self.best = shared["best"]

    def _check_manifest_names(self, name: str) -> None:
        """Raises when another file name in this directory gets the same commit record."""
        clash = sorted({c.filepath for c in attached_callbacks(self.model)
                        if isinstance(c, ModelCheckpoint) and c.filepath != self.filepath
                        and c._directory_template == self._directory_template
                        and _manifest_name(c.filepath) == name})
        if clash:
            raise CallbackConfigError(
                f"ModelCheckpoint(filepath={self.filepath!r}) and {clash} write to one "
                f"directory and would share the commit record {name!r}. Fix: give their file "
                "names different letters or digits (e.g. 'best.keras' and 'last.keras'), or "
                "different directories.")

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save_model(epoch=epoch, batch=None, logs=logs)

    def on_train_end(self, logs=None):
        def report():
            self._manager.finish()
            if self.checkpoints:
                add_to_result(self._result())

        self.coordinator.run_on_chief("ModelCheckpoint.result", report, StorageError)

    def _save_model(self, epoch, batch, logs):
        logs = dict(logs or {})
        if batch is not None:
            keras_compat.sync_batchnorm_statistics(self.model)
        self._check_template_keys(logs)
        current = logs.get(self.monitor)
        if self.save_best_only:
            current = self.monitored(logs, self.monitor)
        if self.monitor_op is None and current is not None:
            self._set_monitor_op()  # private: keras MonitorCallback
        self._manager.mode = self._mode()
        # private: keras MonitorCallback._is_improvement
        improved = current is not None and bool(self._is_improvement(current, self.best))
        path = self._format_path(epoch, batch, logs)
        record = {"path": path, "epoch": epoch + 1, "batch": None if batch is None else batch + 1,
                  "monitor": self.monitor, "value": None if current is None else float(current),
                  "iterations": _iterations(self.model)}

        def save() -> dict[str, Any] | None:
            """Chief: decides, says so and writes; every worker takes the chief's decision,
            record and best value (one exchange per save), so they agree even when each
            worker's logs differ (a custom loop that does not reduce them)."""
            if not (improved or not self.save_best_only or current is None):
                self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from "
                          f"{_fmt(self.best)}")
                return None
            if self.save_best_only:
                self._say(f"\nEpoch {epoch + 1}: {self.monitor} improved from "
                          f"{_fmt(self.best)} to {_fmt(current)}, saving model to {path}")
            else:
                self._say(f"\nEpoch {epoch + 1}: saving model to {path}")
            if improved:
                self.best = float(current)
            record["time"] = time.time()
            self._manager.save_file(
                record, self._writer(),
                {"monitor": self.monitor,
                 "best_value": None if self.best is None else float(self.best)},
                on_commit=lambda: self._say(
                    f"\nEpoch {epoch + 1}: finished saving model to {path}"))
            return {"record": record, "best": self.best}

        saved = self.coordinator.run_on_chief("ModelCheckpoint.save", save, StorageError)
        if saved is None:
            return
        # The other workers' turn; the chief set its best before writing the manifest.
        self.best = saved["best"]
        self._manager.add(saved["record"])

    def _writer(self):
        """What writes the checkpoint to the manager's local temp file: the model now, or,
        with `async_commit`, a snapshot taken now (after the previous save is done, so
        one snapshot at most is held), written later in the background."""
        if not self.async_commit:
            return self._write_model
        self._manager.wait()
        return ModelSnapshot.take(self.model, weights_only=self.save_weights_only).write

    def _write_model(self, path: str) -> None:
        """Writes the model (or its weights) to the local temp file the manager commits."""
        if self.save_weights_only:
            self.model.save_weights(path, overwrite=True)
        else:
            self.model.save(path, overwrite=True)

    def _mode(self) -> str | None:
        """Which monitored value is best, in the manager's terms ('max', 'min' or None)."""
        if self.monitor_op is None:
            return None
        return "max" if self.monitor_op == ops.greater else "min"

    def _result(self) -> dict[str, Any]:
        best = self.best_checkpoint()
        common = {"epoch": best["epoch"], "run_id": self.run_id, "manifest": self.manifest_url}
        if best["value"] is None or self._mode() is None:
            return {"last_checkpoint": best["path"], **common,
                    "note": f"no best tracked: {self.monitor!r} was never logged, so this is "
                            "the last checkpoint"}
        return {"best_checkpoint": best["path"], **common, "monitor": self.monitor,
                "value": best["value"]}

    def best_checkpoint(self) -> dict[str, Any] | None:
        """The best kept checkpoint's record (path, epoch, value...), same on every worker."""
        if self._manager is None:
            return None
        self._manager.mode = self._mode()
        return self._manager.best()

    def _format_path(self, epoch, batch, logs) -> str:
        values = {**logs, "epoch": epoch + 1, "run_id": self.run_id}
        if batch is not None and "batch" not in logs:
            values["batch"] = batch + 1
        return self.filepath.format(**values)

    def _check_template_keys(self, logs: dict[str, Any]) -> None:
        if self._checked_keys:
            return
        self._checked_keys = True
        missing = self._fields - set(logs) - {"epoch", "batch", "run_id"}
        if missing:
            message = (
                f"ModelCheckpoint(filepath={self.filepath!r}) uses {sorted(missing)}, which "
                f"are not in the logs. Available: {', '.join(sorted(logs)) or '(none)'}, plus "
                "epoch, batch, run_id. Fix: use available names in the template."
            )
            raise CallbackConfigError(message)

    def _say(self, message: str) -> None:
        if self.verbose > 0 and self.is_chief:
            io_utils.print_msg(message)


def _manifest_name(filepath: str) -> str:
    """`best.<file name template>.json`, with characters other than letters, digits, `.`, `_`
    and `-` replaced by `_` (`last.keras` -> `best.last.keras.json`)."""
    return f"best.{re.sub(r'[^A-Za-z0-9._-]', '_', posixpath.basename(filepath))}.json"


def _iterations(model) -> int | None:
    """The training steps the model's optimizer has taken (None without one)."""
    optimizer = getattr(model, "optimizer", None)
    return None if optimizer is None else int(optimizer.iterations.numpy())


def _fmt(value) -> str:
    return "None" if value is None else f"{float(value):.5f}"

