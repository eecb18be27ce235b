"""ModelCheckpoint: chief-only, atomic saves to any fsspec URL, with retention and a manifest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import posixpath
import string
import time
import warnings
from typing import Any

import keras
from keras.src import ops
from keras.src.utils import io_utils

from disttrain import keras_compat, storage
from disttrain.callbacks.base import DistributedCallback
from disttrain.cluster import ENV_RESULT_FILE
from disttrain.errors import CallbackConfigError, StorageError

MANIFEST = "best.json"
PENDING = ".pending.json"


class ModelCheckpoint(DistributedCallback, keras.callbacks.ModelCheckpoint):
    """Saves the model (or its weights) at some frequency, safely on N workers.

    Same arguments and meaning as `keras.callbacks.ModelCheckpoint`, plus
    `max_to_keep`, `strict` and `overwrite`. Differences, all on the safe side:

    - Only the chief writes; the save decision is the chief's and is followed by
      every worker, and non-chief workers write nothing anywhere.
    - Every file is committed atomically (local: temp file in the same directory,
      fsync, `os.replace`; object stores: one whole-object upload), so a crash
      leaves the previous checkpoint or the new one, never a torn file.
    - `filepath` is any fsspec URL (local path, `file://`, `gs://`, `s3://`,
      `memory://`). Besides `{epoch}`, `{batch}` and log keys with format specs
      (`{val_loss:.4f}`) it accepts `{run_id}`, identical on every worker. The
      directory part may only use `{run_id}`.
    - After each save a manifest `best.json` is written in the checkpoint
      directory: the best checkpoint (path, epoch, monitor value, run id) and the
      checkpoints kept. It is the commit point: files dropped by `max_to_keep`
      are deleted only after it, so it never names a missing file. Readers
      should trust it rather than list files.
    - A write failure on the chief (permissions, disk full, credentials) raises
      the same `StorageError` on every worker instead of hanging them.
    - At train begin the destination is probed for writability, and a directory
      holding the manifest of a different run is refused (pass `overwrite=True`
      or put `{run_id}` in the path); a file this run did not write is never
      replaced unless `overwrite=True`. When the manifest belongs to this same
      run (a restarted attempt), its best value is restored, so a restart never
      replaces a better checkpoint with a worse one.
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
        strict: raise on missing metrics (default) instead of warning.
        overwrite: allow replacing files of other runs in the destination.
        async_commit: return to training once the model is written to its temp
            file, and commit it (fsync and rename, or the upload to an object
            store, then the manifest and deletions) in a background thread. The
            training thread then waits about as long as a plain `model.save`
            (`python -m benchmarks`). Guarantees are unchanged: each file appears
            atomically and a crash leaves the previous checkpoint. What changes:
            a checkpoint is committed shortly after `on_epoch_end` returns rather
            than before, and a failure of that commit is raised on every worker,
            with the chief's message, at the next save or at the end of `fit`.
            `fit` returns only after the last commit; a process that ends
            otherwise (an exception, `disttrain.Preempted`) still finishes it
            before the interpreter exits. Default False: the commit is done when
            the callback returns, as in Keras.

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
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise CallbackConfigError(
                f"ModelCheckpoint(max_to_keep={max_to_keep!r}): must be a positive integer "
                "or None (keep all). Fix: pass e.g. max_to_keep=3."
            )
        self.max_to_keep = max_to_keep
        self.strict = strict
        self.overwrite = overwrite
        self.async_commit = bool(async_commit)
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: concurrent.futures.Future | None = None
        self._fields = _template_fields(filepath)
        directory = posixpath.dirname(filepath)
        bad = _template_fields(directory) - {"run_id"}
        if bad:
            raise CallbackConfigError(
                f"ModelCheckpoint(filepath={filepath!r}): the directory part uses "
                f"{sorted(bad)}; only {{run_id}} may appear there, so every checkpoint of a run "
                "lands in one directory with one manifest. Fix: move the other fields into "
                "the file name."
            )
        self._directory_template = directory or "."
        self.directory: str | None = None
        self.checkpoints: list[dict[str, Any]] = []
        self._stored: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._checked_keys = False

    @property
    def manifest_url(self) -> str:
        return storage.join(self.directory or self._directory_template, MANIFEST)

    def on_train_begin(self, logs=None):
        self.directory = self._directory_template.format(run_id=self.run_id)

        def preflight() -> dict[str, Any]:
            """Chief: checks the destination; this run's saved state, if resuming."""
            self._finish_commit()
            self._stored = None
            storage.probe_writable(self.directory)
            manifest = storage.read_json(self.manifest_url)
            if manifest is None:
                return {}
            if manifest.get("run_id") == self.run_id or self.overwrite:
                storage.remove_stale_temporaries(self.directory)
            if manifest.get("run_id") != self.run_id and not self.overwrite:
                raise StorageError(
                    f"ModelCheckpoint: {self.directory!r} holds checkpoints of run "
                    f"{manifest.get('run_id')!r} ({self.manifest_url}), this is run "
                    f"{self.run_id!r}. Refusing to mix or overwrite them. Fix: use a new "
                    "directory, put {run_id} in filepath, or pass overwrite=True."
                )
            if manifest.get("run_id") != self.run_id:
                return {}
            return {"best": manifest.get("best_value"),
                    "checkpoints": manifest.get("checkpoints", [])}

        shared = self.coordinator.run_on_chief("ModelCheckpoint.preflight", preflight,
                                               StorageError)
        self.checkpoints = shared.get("checkpoints", [])
        if shared.get("best") is not None and self.save_best_only:
            self.best = shared["best"]

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save_model(epoch=epoch, batch=None, logs=logs)

    def on_train_end(self, logs=None):
        def report():
            self._finish_commit()
            result_file = os.environ.get(ENV_RESULT_FILE)
            if result_file and self.checkpoints:
                storage.write_json(result_file, self._result())

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
            self._set_monitor_op()
        improved = current is not None and bool(self._is_improvement(current, self.best))
        path = self._format_path(epoch, batch, logs)
        record = {"path": path, "epoch": epoch + 1, "batch": None if batch is None else batch + 1,
                  "monitor": self.monitor, "value": None if current is None else float(current)}

        def save() -> bool:
            """Chief: decides, says so and writes; every worker takes the chief's decision
            (one exchange per save)."""
            if not (improved or not self.save_best_only or current is None):
                self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from "
                          f"{_fmt(self.best)}")
                return False
            if self.save_best_only:
                self._say(f"\nEpoch {epoch + 1}: {self.monitor} improved from "
                          f"{_fmt(self.best)} to {_fmt(current)}, saving model to {path}")
            else:
                self._say(f"\nEpoch {epoch + 1}: saving model to {path}")
            if improved:
                self.best = float(current)
            self._write(record)
            return True

        if not self.coordinator.run_on_chief("ModelCheckpoint.save", save, StorageError):
            return
        if improved:  # the other workers' turn; the chief set it before writing the manifest
            self.best = float(current)
        self.checkpoints = self._retained(
            [c for c in self.checkpoints if c["path"] != path] + [record]
        )[0]

    def _write(self, record: dict[str, Any]) -> None:
        """Chief only: the file, the pending marker, the commit, the manifest, deletions.

        A file is this run's to replace when its records, its manifest (kept or
        being deleted) or its pending marker name it: a restarted attempt has lost
        its in-memory records, a crash between a file's commit and the manifest
        leaves the file named by the pending marker only, and a crash during
        retention leaves files the manifest lists under `deleting`. The marker is
        written only for a path the manifest does not keep already (a fixed file
        name is claimed by its first save). A never-committed file is deleted when
        a later save names another path; deletions that did not happen are retried
        at the next save. A save that fails with an error (a full disk) removes its
        own pending marker, so the directory is left exactly as it was. With
        `async_commit` everything after the model is written to its temp file runs
        in the background, in the same order; the previous commit is always
        finished (or its error raised) first.
        """
        self._finish_commit()
        path = record["path"]
        manifest, pending = self._stored or self._read_stored()
        kept_before = {c.get("path") for c in manifest.get("checkpoints", [])}
        deleting_before = {p for p in manifest.get("deleting", []) if storage.exists(p)}
        if pending.get("path") not in (None, path) and pending["path"] not in kept_before:
            storage.remove(pending["path"])
        ours = (path in kept_before or path in deleting_before or pending.get("path") == path
                or any(c["path"] == path for c in self.checkpoints))
        if not self.overwrite and not ours and storage.exists(path):
            raise StorageError(
                f"ModelCheckpoint: {path!r} already exists and was not written by run "
                f"{self.run_id!r}. Refusing to overwrite it. Fix: use a new directory, put "
                "{run_id} or {epoch} in filepath, or pass overwrite=True."
            )
        staged = self._stage(path)
        kept, dropped = self._retained(
            [c for c in self.checkpoints if c["path"] != path] + [record]
        )
        kept_paths = {c["path"] for c in kept}
        deleting = sorted(({c["path"] for c in dropped} | deleting_before) - kept_paths)
        commit = functools.partial(self._commit, record, staged, path not in kept_before,
                                   pending, self._manifest(kept, deleting), deleting)
        if self.async_commit:
            if self._committer is None:
                self._committer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="disttrain-checkpoint-commit")
            self._in_flight = self._committer.submit(commit)
        else:
            commit()

    def _stage(self, path: str) -> storage.StagedFile:
        """Writes the model (or its weights) to a temp file that `_commit` makes `path`."""
        staged = storage.StagedFile(path)
        try:
            try:
                if self.save_weights_only:
                    self.model.save_weights(staged.path, overwrite=True)
                else:
                    self.model.save(staged.path, overwrite=True)
            except OSError as e:
                raise staged.writing_failed(e) from e
            staged.check_written()
        except BaseException:
            staged.discard()
            raise
        return staged

    def _commit(self, record: dict[str, Any], staged: storage.StagedFile, claim: bool,
                pending: dict[str, Any], manifest: dict[str, Any], deleting: list[str]) -> None:
        """Chief only: commits `staged` to the record's path, then the manifest.

        `claim`: write the pending marker first (the manifest does not list the path
        yet). `pending`: the marker found before this save ({} for none).
        """
        path = record["path"]
        self._stored = None
        try:
            if claim:
                storage.write_json(self._pending_url, {"run_id": self.run_id, "path": path})
            staged.commit()
        except BaseException:
            staged.discard()
            if claim and pending.get("path") != path:
                self._drop_pending_marker()
            raise
        storage.write_json(self.manifest_url, manifest)
        if claim or pending:
            storage.remove(self._pending_url)
        self._stored = (manifest, {})
        for old in deleting:
            try:
                storage.remove(old)
            except StorageError as e:
                warnings.warn(
                    f"ModelCheckpoint: could not delete {old!r}, which max_to_keep dropped "
                    f"({e}); the next save retries.",
                    stacklevel=2,
                )
        self._say(f"\nEpoch {record['epoch']}: finished saving model to {path}")

    def _read_stored(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Chief: this run's manifest and pending marker as stored ({} for none, or for
        another run's). After a successful commit `_stored` holds them instead, so a
        save to an object store makes no reads; a failed commit clears it."""
        manifest = storage.read_json(self.manifest_url) or {}
        pending = storage.read_json(self._pending_url) or {}
        return ({} if manifest.get("run_id") != self.run_id else manifest,
                {} if pending.get("run_id") != self.run_id else pending)

    def _finish_commit(self) -> None:
        """Chief: waits for the background commit of the previous save, if any, and
        raises its error."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _drop_pending_marker(self) -> None:
        """After a failed save, removes the pending marker this save wrote.

        The failed write committed nothing, so the marker claims nothing and the
        directory is left as it was before the save (a marker that already named
        the same path, from a crash, is kept by the caller). Best effort: the
        original error is the one that matters.
        """
        with contextlib.suppress(StorageError):
            storage.remove(self._pending_url)

    @property
    def _pending_url(self) -> str:
        return storage.join(self.directory, PENDING)

    def _retained(self, records: list[dict[str, Any]]):
        if self.max_to_keep is None or len(records) <= self.max_to_keep:
            return records, []
        if self.save_best_only:
            sign = 1.0 if self.monitor_op == ops.greater else -1.0
            ranked = sorted(
                records,
                key=lambda c: (c["value"] is not None, sign * (c["value"] or 0.0)),
                reverse=True,
            )
            keep = ranked[: self.max_to_keep]
            return [c for c in records if c in keep], [c for c in records if c not in keep]
        return records[-self.max_to_keep:], records[: -self.max_to_keep]

    def _result(self) -> dict[str, Any]:
        best = self.best_checkpoint()
        return {"best_checkpoint": best["path"], "epoch": best["epoch"],
                "monitor": self.monitor, "value": best["value"], "run_id": self.run_id,
                "manifest": self.manifest_url}

    def _manifest(self, kept: list[dict[str, Any]], deleting: list[str]) -> dict[str, Any]:
        best = self._best_of(kept)
        return {
            "run_id": self.run_id,
            "path": best["path"],
            "epoch": best["epoch"],
            "monitor": self.monitor,
            "value": best["value"],
            "best_value": None if self.best is None else float(self.best),
            "checkpoints": kept,
            "deleting": deleting,
            "written_at": time.time(),
        }

    def best_checkpoint(self) -> dict[str, Any] | None:
        """The best kept checkpoint's record (path, epoch, value...), same on every worker."""
        return self._best_of(self.checkpoints) if self.checkpoints else None

    def _best_of(self, kept: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [c for c in kept if c["value"] is not None]
        if not scored or self.monitor_op is None:
            return kept[-1]
        greater = self.monitor_op == ops.greater
        return (max if greater else min)(scored, key=lambda c: c["value"])

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


def _fmt(value) -> str:
    return "None" if value is None else f"{float(value):.5f}"


def _template_fields(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise CallbackConfigError(
            f"ModelCheckpoint(filepath={template!r}) is not a valid template: {e}. Fix: "
            "balance the braces, or double them ('{{', '}}') for literal braces."
        ) from None
    fields = set()
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise CallbackConfigError(
                f"ModelCheckpoint(filepath={template!r}) has a positional field '{{}}'. "
                "Fix: name it, e.g. {epoch:02d} or {val_loss:.4f}."
            )
        name = field.split(".")[0].split("[")[0]
        try:
            format(1 if name in ("epoch", "batch") else 1.0, spec or "")
        except ValueError:
            raise CallbackConfigError(
                f"ModelCheckpoint(filepath={template!r}): format spec {spec!r} of {{{field}}} "
                "is invalid. Fix: use a spec such as :02d for epoch or :.4f for metrics."
            ) from None
        fields.add(name)
    return fields
