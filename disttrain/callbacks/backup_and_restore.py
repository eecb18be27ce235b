"""BackupAndRestore: resume a multi-worker job where it stopped, safely."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
import time

import keras
import numpy as np
from keras.src.utils import io_utils  # private: keras.src

from disttrain import keras_compat, resume, storage
from disttrain.callbacks.base import DistributedCallback, attached_callbacks
from disttrain.errors import (
    PREEMPTED_EXIT_CODE,
    CallbackConfigError,
    Preempted,
    StorageError,
)
from disttrain.keras_compat import persistent_epoch_iterator
from disttrain.report import run_files
from disttrain.resume.preemption import PreemptionWatch
from disttrain.storage.snapshot import ModelSnapshot

# What every worker part records about its backup, compared with the manifest on restore.
_PART_POSITION = ("epoch", "batches", "passes", "workers")


class BackupAndRestore(DistributedCallback, keras.callbacks.BackupAndRestore):
    """Backs up the training state and resumes from it after a failure, on N workers.

    Same arguments and meaning as `keras.callbacks.BackupAndRestore`, plus
    `verbose`. Differences, all on the safe side:

    - Only the chief writes. Each backup is a new directory
      `<backup_dir>/backup-<NNNNNN>/` committed with a manifest written last, so
      a crash mid-backup leaves the previous backup intact and trusted; older
      backups are deleted only after the new one is committed (two are kept with
      `double_checkpoint=True`). `backup_dir` is any fsspec URL and may use
      `{run_id}`; every worker must be able to read it.
    - On restart every worker loads the same committed backup (the chief picks it
      and broadcasts its name): model and optimizer weights, the epoch to resume
      from, and the state of the other disttrain callbacks on the model
      (EarlyStopping's patience counter, best value and best weights,
      ReduceLROnPlateau's counters), which Keras's version forgets.
      ModelCheckpoint keeps its own state in its manifest, which is newer.
    - Each worker also writes its own part, `worker-<rank>.json`, into the new
      backup directory: the random state its training input stream started from
      (Python `random`, NumPy's global generator, the `tf.random` global
      generator), which `tf.py_function`/`numpy_function` maps and generators in
      the pipeline draw from. The chief commits the backup (manifest last, listing
      every part with its sha256) only once every part is written, so a crash at
      any point leaves the previous backup complete. On resume on the same number
      of workers each worker restores its state as the replayed input stream
      starts, so such a pipeline continues exactly even when the restarted process
      seeds otherwise; on another number of workers the parts are dropped with a
      notice. A backup with a missing, corrupted or mismatched part is refused
      with `StorageError` before anything loads, and left as it is.
    - A failed backup write on any worker raises the same `StorageError` on every
      worker, and nothing is committed.

    - With an integer `save_freq`, training resumes inside the epoch, at the
      batch after the backup (Keras runs the whole epoch again). On several
      workers with a `tf.data.Dataset` or arrays of known length, an input that
      reshuffles or augments at random every epoch continues exactly where an
      uninterrupted run would be; otherwise the batches already trained are
      drawn and skipped, exact for a deterministic input order (see
      `docs/resume.md`). That epoch's training metrics average only the batches
      run after the restart. A backup taken after an epoch's last batch is
      taken as the next epoch begins instead.
    - A backup resumes on another number of workers (same global batch: the
      same steps; see `docs/resume.md#another-number-of-workers`).
    - Preemption: during `fit`, SIGTERM on any worker makes every worker stop
      after the same training step (agreed through `disttrain.resume.preemption`),
      the chief back up there, and every worker raise `disttrain.errors.Preempted`,
      which exits the process with 75; a second SIGTERM kills at once. When
      that step is the epoch's last batch (and Keras knows the number of
      batches), the epoch's end still runs (validation, `on_epoch_end`) and the
      backup is taken as the next epoch begins, so a restart never finds an
      epoch trained but not ended; if no epoch follows, `fit` just returns.
    - A backup written by a model whose variables differ in number, shape or
      dtype is refused with `CallbackConfigError` before anything is loaded.

    The backup of an epoch is taken when the next epoch begins, after every
    callback has finished the epoch, so the callback states it holds match the
    epoch it resumes from whatever the order of the callback list.
    `python -m launch.local --max-restarts K` and the Kubernetes Job's restart
    budget restart the job with the same `DISTTRAIN_RUN_ID`, so `{run_id}` in
    `backup_dir` finds the backup of the failed attempt.

    Args:
        backup_dir: where backups go (URL or path).
        save_freq: `"epoch"` or an integer number of batches.
        double_checkpoint: keep the two latest backups instead of one.
        delete_checkpoint: remove `backup_dir` when training ends normally.
        verbose: 0 or 1 (messages on the chief when resuming).
        random_state: opt-in (default False): every worker writes its part (its
            input stream's random state) into each backup and restores it on
            resume, for `py_function`/`numpy_function` maps that draw from
            Python/NumPy/`tf.random` global generators. Every worker then needs
            write access to `backup_dir` (with the default only the chief writes,
            and non-chief workers may mount it read-only). `False` writes no parts.
        retention: a `storage.Retention` policy for older backups, e.g.
            `Retention(every_epochs=10)` or `Retention(every_hours=6)`; the
            latest backup (two with `double_checkpoint`) is always kept as well.
            `best` is refused (backups have no monitored value). Kept backups are
            removed with the rest at the end when `delete_checkpoint=True`.
        async_commit: snapshot, then write: a backup returns to training once the
            model's and optimizer's variables are copied to host memory
            (`storage.snapshot.ModelSnapshot`); the chief writes the weights file
            from that snapshot and commits the backup (files, then the manifest,
            then the deletions) in a background thread. Host memory: one more copy
            of the weights and optimizer state while a backup is in flight; at most
            one is (the next backup waits for it first). Guarantees are unchanged:
            a crash leaves the previous backup, and a restart resumes from the
            newest committed one. What changes: a backup is committed a little
            after the step it records, and a failure of its writing or commit is
            raised on every worker, with the chief's message, at the next backup or
            at the end of `fit`. `fit` (and a preemption's exit) returns only after
            the last commit. Default False (see `docs/checkpoints.md`).

    Example:

    ```python
    backup = disttrain.callbacks.BackupAndRestore("gs://bucket/{run_id}/backup")
    model.fit(train, epochs=100, callbacks=[backup, *disttrain.callbacks.recommended(out)])
    ```
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        verbose: int = 0,
        random_state: bool = False,
        retention: storage.Retention | None = None,
        async_commit: bool = False,
    ):
        if not backup_dir:
            raise CallbackConfigError(
                f"BackupAndRestore(backup_dir={backup_dir!r}): empty. Fix: pass a directory "
                "or URL every worker can read, e.g. 'gs://bucket/{run_id}/backup'."
            )
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise CallbackConfigError(
                f"BackupAndRestore(save_freq={save_freq!r}): must be 'epoch' or a positive "
                "number of batches. Fix: pass e.g. save_freq=500."
            )
        self._template = os.fspath(backup_dir)
        self._owner = f"BackupAndRestore(backup_dir={self._template!r})"
        storage.check_run_id_only(self._template, self._owner, _DIRECTORY_FIX)
        super().__init__(
            self._template, save_freq=save_freq, double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self.verbose = verbose
        self.random_state = random_state
        self.async_commit = bool(async_commit)
        if retention is not None and retention.best is not None:
            raise CallbackConfigError(
                f"{self._owner}: retention={retention!r} keeps the best {retention.best} "
                "backups, but backups have no monitored value. Fix: keep the best ones with "
                "ModelCheckpoint(retention=...) and give backups latest/every_* rules."
            )
        latest = 2 if double_checkpoint else 1
        self.retention = dataclasses.replace(
            retention or storage.Retention(),
            latest=max(latest, (retention.latest or 0) if retention else 0))
        if random_state:
            resume.current().stream.enable()
        self.directory: str | None = None
        self._manager: storage.CheckpointManager | None = None
        self._pending_states: dict | None = None
        self._pending_arrays: dict[str, list] = {}
        self._save_due = False
        self._epoch = 0
        self._resume_batches = 0
        self._steps = 0
        self._watch: PreemptionWatch | None = None
        self._preempted_by: str | None = None
        self._resuming = False
        self._first_epoch: int | None = None
        self._pass_base = 0

    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise CallbackConfigError(
                "BackupAndRestore needs a built model before fit(), so that a backup can be "
                "loaded into it. Fix: build it first, e.g. model.build(input_shape) or call "
                "it on one batch."
            )
        self._pending_states = None
        self._save_due = False
        self._resume_batches = 0
        self._steps = 0
        self._preempted_by = None
        self._resuming = False
        self._first_epoch = None
        self._pass_base = 0
        self.directory = storage.expand_run_id(self._template, self.run_id, self._owner,
                                               _DIRECTORY_FIX)
        previous, self._manager = self._manager, storage.CheckpointManager(
            self.directory, self.run_id, retention=self.retention,
            step_prefix=run_files.BACKUP_PREFIX, owner="BackupAndRestore",
            async_commit=self.async_commit)

        resume.current().stream.begin_fit()

        def find_latest() -> dict | None:
            if previous is not None:  # a fit that raised may have left a backup in flight
                previous.wait()
            self._manager.open()
            _refuse_damaged(self._manager.damaged())
            if not self._manager.checkpoints:
                return None
            _check_parts(self._manager.latest())
            return self._manager.checkpoints[-1]

        latest = self.coordinator.run_on_chief("BackupAndRestore.find", find_latest, StorageError)
        error = None
        if latest:
            self._manager.add(latest)
            try:
                self._restore(latest["path"])
            except Exception as e:  # noqa: BLE001 - reported to every worker below
                error = e
        self.coordinator.raise_if_any("BackupAndRestore.restore", error, StorageError)
        if self._pending_states is not None:
            self._apply_callback_states(final=False)
        self._watch = PreemptionWatch(self.coordinator).start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_epoch is None:
            self._first_epoch = epoch
        if self._pending_states is not None:
            self._apply_callback_states(final=True)
        if self._preempted_by is not None:
            self._save_model(epoch=epoch, batches=0)
            self._exit_preempted(self._preempted_by, f"the end of epoch {epoch}")
        if self._save_due:
            self._save_due = False
            self._save_model(epoch=epoch, batches=0)
        if self._resuming:
            persistent_epoch_iterator.skip_batches_of_next_epoch(
                self._resume_batches, passes=self._passes(epoch))
            if self._resume_batches:
                self._last_batch_seen = self._resume_batches - 1
            self._resume_batches = 0
            self._resuming = False

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        super().on_train_batch_end(batch, logs)
        if self._watch is not None and self._watch.step_done(self._steps):
            if self._is_last_batch(batch):
                # The epoch's last batch: its end (validation, on_epoch_end) runs first and
                # the backup is taken as the next epoch begins, recording the epoch complete.
                self._preempted_by = self._watch.requested_by
                return
            self._save_model(epoch=self._epoch, batches=batch + 1)
            self._exit_preempted(self._watch.requested_by,
                                 f"epoch {self._epoch + 1}, batch {batch + 1}")

    def _exit_preempted(self, requester: str | None, where: str):
        """Ends the watch and raises `Preempted` once the backup at `where` is committed."""
        self._end_watch()
        self._finish_backups()
        message = (f"preempted (SIGTERM on {requester}): backup saved at {where}; exiting "
                   f"with {PREEMPTED_EXIT_CODE} to be restarted")
        print(f"disttrain: {message}", file=sys.stderr, flush=True)
        raise Preempted(message)

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        self._save_due = self._save_due or self.save_freq == "epoch"

    def _is_last_batch(self, batch: int) -> bool:
        """Whether `batch` ends the epoch (False when Keras does not know the epoch's length)."""
        steps = (self.params or {}).get("steps")
        return bool(steps) and batch + 1 >= steps

    def _save_model(self, epoch: int | None = None, batches: int | None = None):
        """Backs up now, recording where training resumes: after `batches` batches of
        `epoch` when given; else (Keras's integer `save_freq`) after the batches done so
        far in this epoch, or, after its last batch, as the next epoch begins."""
        if batches is None:
            if self._is_last_batch(self._last_batch_seen):
                # Not "epoch done, end not run": the backup waits for the next epoch's begin.
                self._save_due = True
                return
            epoch, batches = self._epoch, self._last_batch_seen + 1
        keras_compat.sync_batchnorm_statistics(self.model)
        metadata = {
            "epoch": epoch,
            "batches": batches,
            "passes": self._passes(epoch),
            "workers": self.coordinator.num_workers,
            "iterations": int(self.model.optimizer.iterations.numpy())
            if self.model.optimizer is not None else None,
            "time": time.time(),
            "run_id": self.run_id,
            "model": _fingerprint(self.model),
            "callbacks": {},
            "parts": ([run_files.BACKUP_PART.format(rank=r)
                       for r in range(self.coordinator.num_workers)] if self.random_state else []),
        }
        arrays: dict[str, np.ndarray] = {}
        for key, callback in self._stateful_callbacks():
            state, callback_arrays = callback.backup_state()
            metadata["callbacks"][key] = state
            for i, array in enumerate(callback_arrays):
                # Written later with async_commit: a copy the callback cannot change.
                arrays[f"{key}/{i}"] = np.array(array) if self.async_commit else np.asarray(array)
        written = self._write_parts(metadata) if self.random_state else {}
        committed = self.coordinator.run_on_chief(
            "BackupAndRestore.save", lambda: self._write(metadata, arrays, written), StorageError
        )
        self._manager.add(committed)

    def _write_parts(self, metadata: dict) -> dict[str, dict]:
        """Every worker writes its part into the next backup's directory (no manifest
        yet: nothing trusts it before the chief commits); one exchange brings every
        part's size and sha256, or a worker's error, to every worker. Returns the
        parts as the manifest lists them; raises the first failure on every worker."""
        name = run_files.BACKUP_PART.format(rank=self.coordinator.rank)
        part = {"rank": self.coordinator.rank, "run_id": self.run_id,
                **{key: metadata[key] for key in _PART_POSITION},
                "random_state": resume.current().stream.stream_start()}
        try:
            data = json.dumps(part, sort_keys=True).encode("utf-8")
            storage.atomic_write_bytes(storage.join(self._manager.next_url, name), data)
            report = {"name": name, **storage.describe_bytes(data)}
        except Exception as e:  # noqa: BLE001 - reported to every worker below
            report = {"error": f"{type(e).__name__}: {e}"}
        reports = [json.loads(r) for r in
                   self.coordinator.gather("BackupAndRestore.parts", json.dumps(report))]
        for rank, reported in enumerate(reports):
            if "error" in reported:
                raise StorageError(
                    f"BackupAndRestore: writing its part of backup "
                    f"{posixpath.basename(self._manager.next_url)} failed on "
                    f"{self.coordinator.cluster.label_of_rank(rank)}: {reported['error']}. "
                    "Nothing was committed; the previous backup stays the one to resume from."
                )
        return {r["name"]: {"size": r["size"], "sha256": r["sha256"]} for r in reports}

    def on_train_end(self, logs=None):
        if self._preempted_by is not None and self.is_chief:
            print(f"disttrain: preempted (SIGTERM on {self._preempted_by}) on the last batch "
                  "of the last epoch: training finished", file=sys.stderr, flush=True)
        self._end_watch()
        resume.current().skip.cancel()
        resume.current().stream.end_fit()
        if self._pending_states is not None:
            self._apply_callback_states(final=True)
        if self._save_due and not self.delete_checkpoint:
            self._save_due = False
            self._save_model(epoch=self._current_epoch, batches=0)
        self._finish_backups()
        if self.delete_checkpoint:
            self.coordinator.run_on_chief(
                "BackupAndRestore.delete",
                lambda: storage.remove_committed(self.directory),
                StorageError,
            )

    def _finish_backups(self) -> None:
        """Waits for the chief's backup in flight (`async_commit`); its failure is raised
        on every worker."""
        if self.async_commit:
            self.coordinator.run_on_chief("BackupAndRestore.commit", self._manager.wait,
                                          StorageError)

    def _end_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _write(self, metadata: dict, arrays: dict[str, np.ndarray],
               written: dict[str, dict]) -> dict:
        """Chief: writes the weights and callback states, and commits them with the workers'
        parts (`written`) as the next backup (the manager then deletes the backups
        retention does not keep); with `async_commit`, from a snapshot taken now, in the
        background. Returns the backup's record."""
        self._manager.wait()  # the previous backup's failure; one snapshot in flight at most
        save_weights = (ModelSnapshot.take(self.model, weights_only=True).write
                        if self.async_commit else self.model.save_weights)

        def write(tmp: str) -> dict[str, str]:
            files = {run_files.BACKUP_WEIGHTS: os.path.join(tmp, run_files.BACKUP_WEIGHTS)}
            save_weights(files[run_files.BACKUP_WEIGHTS])
            if arrays:
                files[run_files.BACKUP_CALLBACK_STATES] = os.path.join(
                    tmp, run_files.BACKUP_CALLBACK_STATES)
                np.savez(files[run_files.BACKUP_CALLBACK_STATES], **arrays)
            return files

        self._manager.save_directory(write, metadata, written)
        return self._manager.checkpoints[-1]

    def _restore(self, url: str) -> None:
        manifest = storage.read_manifest(url)
        metadata = manifest["metadata"]
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        _check_same_model(metadata.get("model"), _fingerprint(self.model), url)
        with storage.local_copy(storage.join(url, run_files.BACKUP_WEIGHTS)) as weights:
            self.model.load_weights(weights)
        arrays: dict[str, list] = {}
        if run_files.BACKUP_CALLBACK_STATES in manifest["files"]:
            states_url = storage.join(url, run_files.BACKUP_CALLBACK_STATES)
            with storage.local_copy(states_url) as states, np.load(states) as npz:
                for entry in sorted(npz.files, key=lambda k: int(k.rsplit("/", 1)[1])):
                    key = entry.rsplit("/", 1)[0]
                    arrays.setdefault(key, []).append(npz[entry])
        self.model._initial_epoch = metadata["epoch"]  # private: keras Trainer
        self._current_epoch = metadata["epoch"]
        self._resume_batches = metadata["batches"]
        self._resuming = True
        # Backups older than "passes" come from runs that began at epoch 0.
        self._pass_base = metadata.get("passes", metadata["epoch"])
        workers = metadata.get("workers", self.coordinator.num_workers)
        parts = metadata.get("parts", [])
        same_workers = workers == self.coordinator.num_workers
        if not same_workers and self.is_chief:
            dropped = (f"; the random states of its {len(parts)} worker parts (Python random, "
                       "NumPy, tf.random global generator) are not restored, so random draws "
                       "of py_function/numpy_function maps and generators in the input "
                       "continue from this run's seeds" if parts else "")
            print(f"disttrain: BackupAndRestore: {posixpath.basename(url)} was written on "
                  f"{workers} workers, this run has {self.coordinator.num_workers}: it resumes "
                  f"with the same global batches{dropped} (see "
                  f"docs/resume.md#another-number-of-workers)", file=sys.stderr, flush=True)
        if same_workers and parts and self.random_state:
            own = storage.join(url, run_files.BACKUP_PART.format(rank=self.coordinator.rank))
            resume.current().stream.carry(json.loads(storage.read_bytes(own))["random_state"])
        self._pending_states = metadata.get("callbacks", {})
        self._pending_arrays = arrays
        if self.verbose > 0 and self.is_chief:
            io_utils.print_msg(
                f"BackupAndRestore: resuming at epoch {metadata['epoch'] + 1}"
                + (f", batch {metadata['batches'] + 1}" if metadata["batches"] else "")
                + f" from {posixpath.basename(url)} (run {metadata.get('run_id')})"
            )

    def _apply_callback_states(self, final: bool) -> None:
        """Hands the restored states to the other callbacks.

        Done once at train begin, for the callbacks that already ran their own
        `on_train_begin` (which resets them), and again, finally, before the first
        epoch (or at train end if no epoch is left) for those that come after this
        one in the list.
        """
        for key, callback in self._stateful_callbacks():
            if key in self._pending_states:
                callback.restore_state(self._pending_states[key],
                                       self._pending_arrays.get(key, []))
        if final:
            self._pending_states = None
            self._pending_arrays = {}

    def _passes(self, epoch: int) -> int:
        """Whole passes over the input an uninterrupted run makes before `epoch`."""
        return self._pass_base + epoch - (epoch if self._first_epoch is None
                                          else self._first_epoch)

    def _stateful_callbacks(self):
        counts: dict[str, int] = {}
        for callback in attached_callbacks(self.model):
            if type(callback).backup_state is DistributedCallback.backup_state:
                continue
            name = type(callback).__name__
            counts[name] = counts.get(name, 0) + 1
            yield f"{name}-{counts[name]}", callback


_DIRECTORY_FIX = "remove them; a backup directory holds the backups of one run"


def _fingerprint(model) -> list[list]:
    """Shape and dtype of every variable a backup holds, in load order (the model's,
    then the optimizer's), with their paths for messages. Paths carry automatic
    names (`dense_3`) that differ between equal models, so they are not compared."""
    variables = list(model.variables)
    if model.optimizer is not None and model.optimizer.built:
        variables += list(model.optimizer.variables)
    return [[v.path, list(v.shape), str(v.dtype)] for v in variables]


def _refuse_damaged(damaged: list[str]) -> None:
    """Raises `StorageError` when a backup newer than the latest committed one has a manifest
    but a listed file is missing or changed (`CheckpointManager.damaged`)."""
    if not damaged:
        return
    url = damaged[-1]
    raise StorageError(
        f"BackupAndRestore: the backup {url} is damaged: {storage.check_files(url)}. Nothing "
        "was loaded and the backup was left as it is. Fix: put the file back as it was "
        "written, or delete that backup directory to resume from the one before it (or from "
        "scratch)."
    )


def _check_parts(url: str) -> None:
    """Chief, before anything loads: every worker part the backup's manifest expects is
    listed, intact (size, sha256) and records the manifest's position; else `StorageError`
    naming the backup, the part and the fix."""
    metadata = storage.read_manifest(url)["metadata"]
    parts = metadata.get("parts", [])
    problem = storage.check_files(url, parts) if parts else None
    if problem is None and parts:
        if len(parts) != metadata.get("workers"):
            problem = (f"its manifest expects {len(parts)} worker parts for "
                       f"{metadata.get('workers')} workers")
        for rank, name in enumerate(parts):
            if problem is not None:
                break
            part = json.loads(storage.read_bytes(storage.join(url, name)))
            expected = {"rank": rank, **{key: metadata[key] for key in _PART_POSITION}}
            found = {key: part.get(key) for key in expected}
            if found != expected:
                problem = (f"{name} records {_position(found)}, its manifest "
                           f"{_position(expected)} (parts of different backups)")
    if problem is not None:
        raise StorageError(
            f"BackupAndRestore: the backup {url} is damaged: {problem}. Nothing was loaded "
            "and the backup was left as it is. Fix: put the file back as it was written, or "
            "delete that backup directory to resume from the one before it (or from scratch)."
        )


def _position(record: dict) -> str:
    return ", ".join(f"{key} {record[key]}" for key in record)


def _check_same_model(saved: list[list] | None, current: list[list], url: str) -> None:
    """Raises `CallbackConfigError` naming the first difference between two fingerprints."""
    if saved is None or [v[1:] for v in saved] == [v[1:] for v in current]:
        return
    detail = f"the backup holds {len(saved)} variables, this model {len(current)}"
    for i, (old, new) in enumerate(zip(saved, current)):
        if old[1:] != new[1:]:
            detail = (f"variable #{i} is {old[0]!r} {tuple(old[1])} {old[2]} in the backup, "
                      f"{new[0]!r} {tuple(new[1])} {new[2]} in this model")
            break
    raise CallbackConfigError(
        f"BackupAndRestore: the backup {url} was written by a different model or optimizer "
        f"({detail}). Nothing was loaded and the backup was left as it is. Fix: give this "
        "model its own backup_dir (e.g. with {run_id}), or train the model that wrote it."
    )
