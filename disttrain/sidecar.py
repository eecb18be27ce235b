"""`SidecarEvaluator`: evaluates the checkpoints a training run commits, on a task of its own.

Keras 3 dropped `tf.keras.utils.SidecarEvaluator`; this is its counterpart for
disttrain's checkpoints. It runs on the `evaluator` task of a
MultiWorkerMirroredStrategy job (`launch.local --evaluator`, a TFJob's
Evaluator replica, Vertex AI's worker pool 3, the evaluator Job of
`launch.k8s --evaluator`) or in any separate process, and never joins the
training group: `disttrain.strategy()` there is the default single-process
strategy.

What it reads is what `disttrain.callbacks.ModelCheckpoint` commits: the
manifest `best.json` of the checkpoint directory, never a listing, so a file
being written is never read. A restarted evaluator resumes after the last
checkpoint recorded in its `evaluation.csv`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import posixpath
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from disttrain._tf import require_tensorflow

require_tensorflow("disttrain.SidecarEvaluator")

import keras  # noqa: E402 (after the check)
from keras import ops  # noqa: E402

from disttrain import storage  # noqa: E402
from disttrain.report import run_files  # noqa: E402
from disttrain.cluster import Cluster  # noqa: E402
from disttrain.errors import CallbackConfigError, CoordinationError, StorageError  # noqa: E402

_FIXED_COLUMNS = ("epoch", "batch", "path")
_RUN_ID_FIX = "only {run_id} may appear in a directory"
# What loading a checkpoint into a model raises for a missing, corrupt or mismatched file.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)


class SidecarEvaluator:
    """Evaluates every checkpoint a training run commits, from a task outside training.

    Same idea and arguments as tf_keras's `tf.keras.utils.SidecarEvaluator`
    (`model`, `data`, `checkpoint_dir`, `steps`, `max_evaluations`,
    `callbacks`); `start()` runs the loop. For each new checkpoint it loads the
    weights into `model`, runs `model.evaluate` and records the results:

    - a row in `<log_dir>/evaluation.csv`: `epoch`, `batch` (empty for
      checkpoints saved at an epoch end), `path`, then every metric, sorted;
      the whole file is rewritten atomically after each evaluation;
    - with `tensorboard_dir`, scalars `epoch_<metric>` in its `eval` run at
      step `epoch - 1`, so they line up with the `train` and `validation`
      curves `keras.callbacks.TensorBoard` writes in the same directory;
    - with `export_dir`, the best checkpoint by `monitor` copied there
      atomically, with its own manifest `best.json` (`storage.CheckpointManager`,
      one file kept).

    Differences from tf_keras's, all following from disttrain's checkpoints:

    - It trusts only the commit record `best.json` that `ModelCheckpoint`
      writes in `checkpoint_dir` (any fsspec URL), never a directory listing:
      a file the manifest does not list yet is never read, and a checkpoint
      that retention (`max_to_keep`) deleted before its turn is reported as
      skipped. Give every checkpoint its own file name (`{epoch}` in
      `ModelCheckpoint`'s `filepath`, as `recommended()` does): a fixed name
      can be replaced between the manifest read and the load.
    - It evaluates every committed checkpoint in order, or with
      `latest_only=True` only the newest one each time it looks (when it
      falls behind, older ones are skipped).
    - It ends by itself: when the manifest carries the "training finished"
      mark (`storage.training_finished`, written by the chief when `fit` ends
      normally) and the final checkpoint is evaluated, or after
      `max_evaluations` rows. If neither a new checkpoint nor the mark appears
      for `timeout` seconds, it raises `CoordinationError` naming the
      directory (training crashed or was deleted).
    - A checkpoint that fails to load (another architecture, a corrupt file)
      is reported with its path on stderr and skipped; the loop goes on.
    - A restarted evaluator (same `log_dir`) reads `evaluation.csv` back and
      evaluates only checkpoints after the last row, and `export_dir`'s
      manifest back, so the best export is kept.

    Args:
        model: the compiled model to evaluate (its metrics are recorded), or a
            function without arguments returning it. It must have the
            architecture training checkpoints.
        data: evaluation data, anything `model.evaluate` takes as `x`
            (e.g. a `tf.data.Dataset` of `(x, y)` batches).
        checkpoint_dir: the `ModelCheckpoint` directory (URL or local path;
            `{run_id}` is filled in).
        steps: batches per evaluation; `None` runs over all of `data`.
        max_evaluations: stop after this many rows in `evaluation.csv`
            (rows read back on a restart count); `None`: until training ends.
        callbacks: Keras callbacks passed to `model.evaluate`.
        log_dir: where `evaluation.csv` goes; default the parent of
            `checkpoint_dir` (the run directory in `recommended()`'s layout).
        tensorboard_dir: TensorBoard log directory (local path or `gs://`); the
            scalars go to its `eval` run. `None`: no TensorBoard.
        export_dir: where to keep the best checkpoint by `monitor`; `None`: none.
        monitor: the metric `export_dir` ranks by, as `model.evaluate` names it
            (`"loss"`, `"accuracy"`, ...).
        mode: `"auto"`, `"min"` or `"max"` for `monitor` (`"auto"` as Keras
            callbacks decide it).
        latest_only: evaluate only the newest committed checkpoint each time.
        poll_interval: seconds between reads of the manifest while waiting.
        timeout: seconds to wait for a new checkpoint or the end of training
            before raising `CoordinationError`; longer than the longest gap
            between two checkpoints (with `save_best_only`, several epochs).
        run_id: the training run's id; default `DISTTRAIN_RUN_ID`. Needed when
            a directory holds `{run_id}`; when known, a manifest of another run
            is ignored.
        verbose: 1 prints a line per checkpoint, 0 only problems.
        manifest: the commit record to follow: `best.json`, or, when several
            ModelCheckpoints write to the directory, the one's `manifest_name`
            (e.g. `"best.last.keras.json"`).

    Example:

    ```python
    import disttrain

    cluster = disttrain.Cluster.from_env()
    if cluster.is_evaluator:
        disttrain.SidecarEvaluator(
            build_model(), val_ds, "gs://bucket/{run_id}/checkpoints",
            tensorboard_dir="gs://bucket/{run_id}/tensorboard",
            export_dir="gs://bucket/{run_id}/best_evaluated").start()
    else:
        ...  # train with disttrain.callbacks.recommended("gs://bucket/{run_id}")
    ```
    """

    def __init__(
        self,
        model: keras.Model | Callable[[], keras.Model],
        data: Any,
        checkpoint_dir: str,
        steps: int | None = None,
        max_evaluations: int | None = None,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        *,
        log_dir: str | None = None,
        tensorboard_dir: str | None = None,
        export_dir: str | None = None,
        monitor: str = "loss",
        mode: str = "auto",
        latest_only: bool = False,
        poll_interval: float = 5.0,
        timeout: float = 3600.0,
        run_id: str | None = None,
        verbose: int = 1,
        manifest: str = run_files.BEST_CHECKPOINT,
    ):
        for name, value in (("steps", steps), ("max_evaluations", max_evaluations)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise CallbackConfigError(
                    f"SidecarEvaluator({name}={value!r}): must be a positive integer or None. "
                    f"Fix: pass e.g. {name}=10, or leave it out.")
        for name, value in (("poll_interval", poll_interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise CallbackConfigError(
                    f"SidecarEvaluator({name}={value!r}): must be a positive number of seconds. "
                    f"Fix: pass e.g. {name}=30.")
        if mode not in ("auto", "min", "max"):
            raise CallbackConfigError(
                f"SidecarEvaluator(mode={mode!r}): must be 'auto', 'min' or 'max'. Fix: pass "
                "mode='min' for losses, mode='max' for accuracies.")
        self.model = model() if callable(model) and not isinstance(model, keras.Model) else model
        if not getattr(self.model, "compiled", False):
            raise CallbackConfigError(
                "SidecarEvaluator(model=...): the model is not compiled, so evaluate() has no "
                "loss or metrics to record. Fix: compile it as in training (the same loss "
                "and metrics).")
        self.data = data
        self.steps = steps
        self.max_evaluations = max_evaluations
        self.callbacks = list(callbacks or [])
        self.monitor = monitor
        self.mode = mode
        self.latest_only = bool(latest_only)
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        self.verbose = verbose
        self.manifest = manifest
        templates = {"checkpoint_dir": checkpoint_dir, "log_dir": log_dir,
                     "tensorboard_dir": tensorboard_dir, "export_dir": export_dir}
        needs_run_id = any("{run_id}" in t for t in templates.values() if t is not None)
        cluster = Cluster.from_env()
        if run_id is None and needs_run_id:
            run_id = cluster.required_run_id(
                f"SidecarEvaluator(checkpoint_dir={checkpoint_dir!r}) ({{run_id}} in a directory)")
        self.run_id = run_id or cluster.run_id
        expanded = {name: None if t is None else storage.expand_run_id(
            t, self.run_id or "", f"SidecarEvaluator({name}={t!r})", _RUN_ID_FIX)
            for name, t in templates.items()}
        self.checkpoint_dir: str = expanded["checkpoint_dir"]
        self.log_dir: str = expanded["log_dir"] or _parent(self.checkpoint_dir)
        self.tensorboard_dir: str | None = expanded["tensorboard_dir"]
        self.export_dir: str | None = expanded["export_dir"]
        self.csv_path = storage.join(self.log_dir, run_files.EVALUATION_CSV)
        self.evaluations: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self._columns: list[str] | None = None
        self._passed_over: set[tuple[float, float]] = set()
        self._exporter: storage.CheckpointManager | None = None
        self._writer = None
        self._other_run_seen: str | None = None

    @property
    def manifest_url(self) -> str:
        """The commit record of the checkpoint directory, the only thing trusted."""
        return storage.join(self.checkpoint_dir, self.manifest)

    def start(self) -> list[dict[str, Any]]:
        """Runs the evaluation loop until training has finished (or `max_evaluations`).

        Returns:
            Every row of `evaluation.csv` (those of an earlier run of the
            evaluator first), as dicts: `epoch`, `batch`, `path` and the metrics.

        Raises:
            CoordinationError: no new checkpoint and no end of training for
                `timeout` seconds.
            StorageError: the manifest, the CSV or the export cannot be read or written.
            CallbackConfigError: `monitor` is not among the metrics, or the CSV
                of an earlier run has other columns.
        """
        self._load_csv()
        last_progress = time.monotonic()
        while not self._done():
            manifest = self._read_manifest()
            finished = storage.training_finished(manifest)
            pending = self._pending(manifest)
            if self.latest_only and len(pending) > 1:
                for record in pending[:-1]:
                    self._passed_over.add(_key(record))
                    self._skip(record, "a newer checkpoint is committed (latest_only=True)")
                pending = pending[-1:]
            for record in pending:
                self._evaluate(record)
                last_progress = time.monotonic()
                if self._done():
                    break
            if self._done() or (finished and not pending):
                break
            if pending:
                continue
            waited = time.monotonic() - last_progress
            if waited >= self.timeout:
                raise CoordinationError(self._gone_message(manifest, waited))
            time.sleep(min(self.poll_interval, self.timeout - waited))
        self._say(f"done: {len(self.evaluations)} checkpoint(s) in {self.csv_path}"
                  + (f", best exported to {self._exporter.latest()}"
                     if self._exporter is not None and self._exporter.latest() else ""))
        return list(self.evaluations)

    def _done(self) -> bool:
        return self.max_evaluations is not None and len(self.evaluations) >= self.max_evaluations

    def _read_manifest(self) -> dict[str, Any] | None:
        """The checkpoint directory's commit record, or None (none yet, or another run's)."""
        manifest = storage.read_json(self.manifest_url)
        if manifest is None or self.run_id is None or manifest.get("run_id") == self.run_id:
            return manifest
        if self._other_run_seen != manifest.get("run_id"):
            self._other_run_seen = manifest.get("run_id")
            self._warn(f"{self.manifest_url} belongs to run {self._other_run_seen!r}, not "
                       f"{self.run_id!r}: waiting for this run's checkpoints")
        return None

    def _pending(self, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Committed checkpoints after the last one recorded, oldest first."""
        last = _key(self.evaluations[-1]) if self.evaluations else (-math.inf, -math.inf)
        records = (manifest or {}).get("checkpoints", [])
        return sorted((r for r in records if _key(r) > last and _key(r) not in self._passed_over),
                      key=_key)

    def _evaluate(self, record: dict[str, Any]) -> None:
        """Loads one committed checkpoint, evaluates it and records the row.

        The checkpoint is read from a private link or copy, so retention deleting
        it, or a newer checkpoint taking its name, cannot change what is loaded."""
        path = record["path"]
        with contextlib.ExitStack() as stack:
            try:
                local = stack.enter_context(storage.local_copy(path, private=True))
            except StorageError as e:
                self._unreadable(record, e, "read")
                return
            try:
                with warnings.catch_warnings():
                    # A `.keras` file holds the optimizer's state too; evaluation needs none.
                    warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                    self.model.load_weights(local)
            except _LOAD_ERRORS as e:
                self._unreadable(record, e, "load")
                return
            if self._replaced(record):
                return
            metrics = self.model.evaluate(self.data, steps=self.steps, callbacks=self.callbacks,
                                          verbose=0, return_dict=True)
            row = {"epoch": record.get("epoch"), "batch": record.get("batch"), "path": path,
                   **{name: float(value) for name, value in metrics.items()}}
            self._say(f"epoch {row['epoch']}: " + " ".join(
                f"{name}={value:.4f}" for name, value in sorted(metrics.items())) + f" ({path})")
            if self.export_dir is not None:
                self._export(row, local)
        self.evaluations.append(row)
        self._write_csv()
        self._write_tensorboard(row, metrics)

    def _unreadable(self, record: dict[str, Any], error: BaseException, what: str) -> None:
        """A checkpoint that could not be read or loaded: skipped, and reported when the
        manifest still lists it (else retention dropped it, or a newer one took its name)."""
        current = self._listed(record)
        if current is None or _key(current) != _key(record):
            self._skip(record, "no longer in the manifest: dropped by retention (max_to_keep) "
                               "or replaced before it could be read")
            return
        self._passed_over.add(_key(record))
        reason = f"{type(error).__name__}: {error}"
        self._warn(f"could not {what} {record['path']} (epoch {record.get('epoch')}), "
                   f"skipped: {reason}")
        self.skipped.append({**record, "reason": reason})

    def _replaced(self, record: dict[str, Any]) -> bool:
        """True (and reported) when the manifest now lists the checkpoint's file name for
        another checkpoint: the file loaded may be that one (a fixed file name)."""
        current = self._listed(record)
        if current is None or _key(current) == _key(record):
            return False
        self._skip(record, f"its file now holds epoch {current.get('epoch')}: replaced before "
                           "it could be read (give checkpoints their own names, e.g. {epoch})")
        return True

    def _listed(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest's current record for the file of `record`, or None."""
        return next((r for r in (self._read_manifest() or {}).get("checkpoints", [])
                     if r["path"] == record["path"]), None)

    def _skip(self, record: dict[str, Any], reason: str) -> None:
        self.skipped.append({**record, "reason": reason})
        self._say(f"skipped {record['path']} (epoch {record.get('epoch')}): {reason}")

    def _export(self, row: dict[str, Any], local: str) -> None:
        """Copies the checkpoint at `local` to `export_dir` when it is the best so far."""
        if self.monitor not in row:
            raise CallbackConfigError(
                f"SidecarEvaluator(monitor={self.monitor!r}): not among the evaluation's "
                f"metrics {sorted(set(row) - set(_FIXED_COLUMNS))}. Fix: monitor one of them.")
        if self._exporter is None:
            self._exporter = storage.CheckpointManager(
                self.export_dir, self.run_id or "sidecar", max_to_keep=1, keep_best=True,
                mode=self._resolved_mode(), index_name=run_files.BEST_CHECKPOINT,
                owner="SidecarEvaluator")
            self._exporter.open()
        value = row[self.monitor]
        best = (self._exporter.best() or {}).get("value")
        if best is not None and not (value > best if self._exporter.mode == "max"
                                     else value < best):
            return
        destination = storage.join(self.export_dir, posixpath.basename(row["path"]))
        self._exporter.save_file(
            {"path": destination, "epoch": row["epoch"], "value": value,
             "checkpoint": row["path"]},
            lambda staged: shutil.copyfile(local, staged),
            {"monitor": self.monitor, "checkpoint": row["path"]})
        self._say(f"exported epoch {row['epoch']} ({self.monitor}={value:.4f}) to {destination}")

    def _resolved_mode(self) -> str:
        """'min' or 'max' for `monitor`, decided the way Keras callbacks decide `mode='auto'`."""
        probe = keras.callbacks.EarlyStopping(monitor=self.monitor, mode=self.mode)
        probe.set_model(self.model)
        try:
            probe._set_monitor_op()  # private: keras MonitorCallback
        except ValueError:
            raise CallbackConfigError(
                f"SidecarEvaluator(monitor={self.monitor!r}, mode='auto'): Keras cannot tell "
                "whether it should go up or down. Fix: pass mode='min' or mode='max'.") from None
        return "max" if probe.monitor_op == ops.greater else "min"

    def _load_csv(self) -> None:
        """Reads back the rows of an earlier run of the evaluator (a restart)."""
        if not storage.exists(self.csv_path):
            return
        text = storage.read_bytes(self.csv_path).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        self._columns = list(reader.fieldnames or [])
        for row in reader:
            self.evaluations.append({
                "epoch": int(row["epoch"]) if row["epoch"] else None,
                "batch": int(row["batch"]) if row["batch"] else None,
                "path": row["path"],
                **{k: float(v) for k, v in row.items() if k not in _FIXED_COLUMNS and v != ""},
            })
        if self.evaluations:
            last = self.evaluations[-1]
            self._say(f"resuming after epoch {last['epoch']} ({last['path']}): "
                      f"{len(self.evaluations)} row(s) in {self.csv_path}")

    def _write_csv(self) -> None:
        row = self.evaluations[-1]
        columns = [*_FIXED_COLUMNS, *sorted(set(row) - set(_FIXED_COLUMNS))]
        if self._columns is None:
            self._columns = columns
        elif self._columns != columns:
            raise CallbackConfigError(
                f"SidecarEvaluator: {self.csv_path!r} has the columns {self._columns} but this "
                f"evaluation gives {columns}. Fix: compile the model with the same metrics as "
                "before, or use another log_dir.")
        out = io.StringIO()
        writer = csv.DictWriter(out, self._columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()}
                         for r in self.evaluations)
        storage.atomic_write_bytes(self.csv_path, out.getvalue().encode("utf-8"))

    def _write_tensorboard(self, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        if self.tensorboard_dir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                storage.join(self.tensorboard_dir, run_files.EVALUATION_TENSORBOARD_RUN))
        with self._writer.as_default():
            for name, value in metrics.items():
                tf.summary.scalar(f"epoch_{name}", float(value), step=max(0, row["epoch"] - 1))
        self._writer.flush()

    def _gone_message(self, manifest: dict[str, Any] | None, waited: float) -> str:
        last = (f"the last checkpoint committed is epoch {manifest['checkpoints'][-1].get('epoch')}"
                if manifest and manifest.get("checkpoints") else "no checkpoint was committed")
        return (
            f"SidecarEvaluator: no new checkpoint in {self.checkpoint_dir!r} and no 'training "
            f"finished' mark in {self.manifest_url!r} for {waited:.1f} s ({last}). Training "
            "stopped without finishing (crashed, was deleted or preempted for good), or it "
            "checkpoints less often than that. Fix: check the training tasks' logs; if "
            "checkpoints are that far apart, raise timeout (now "
            f"{self.timeout:g} s). A restarted evaluator resumes after the last row of "
            f"{self.csv_path}.")

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"SidecarEvaluator: {message}", flush=True)

    @staticmethod
    def _warn(message: str) -> None:
        print(f"SidecarEvaluator: {message}", file=sys.stderr, flush=True)


def _key(record: dict[str, Any]) -> tuple[float, float]:
    """Where a checkpoint stands in training: (epoch, batch); an epoch-end save comes after
    the batch saves of its epoch."""
    epoch = record.get("epoch")
    batch = record.get("batch")
    return (-math.inf if epoch is None else float(epoch),
            math.inf if batch is None else float(batch))


def _parent(url: str) -> str:
    """The directory holding `url` (a URL or local path)."""
    head, sep, path = url.rpartition("://")
    parent = posixpath.dirname(path.rstrip("/")) or ("" if sep else ".")
    return f"{head}{sep}{parent}"

