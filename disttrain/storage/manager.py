"""CheckpointManager: the commit protocol of one directory of checkpoints.

A checkpoint directory is written by one process (the chief) and read by many,
possibly after a crash of the writer at any moment. The manager decides what a
reader may trust and what may be deleted:

- Commit point. Single-file checkpoints (`save_file`) are listed by an index
  file (`index_name`, e.g. `best.json`), written after the file; a checkpoint
  is committed when the index lists it. Directory checkpoints
  (`save_directory`, `<step_prefix><NNNNNN>/`) are committed by their own
  manifest, written last (`commit_checkpoint`, `is_committed`).
- Pending marker. Before a single file the index does not list yet is
  committed, a marker (`.pending.json`) names it, so after a crash between the
  file and the index the file is still known to be this run's.
- Retention. A `storage.Retention` policy (best k by `value` AND every N
  epochs / steps / hours, ...); `max_to_keep` is its simple case: the latest
  checkpoints, or the best ones by their `value` (`keep_best=True`, ordered by
  `mode`). Dropped checkpoints are
  deleted only after the commit point no longer lists them, so an index never
  names a missing file; deletions that fail are retried at the next save.
- Ownership. The index records the run id: a directory indexed by another run
  is refused, and so is replacing a file this run did not write, unless
  `overwrite=True`.
- Leftovers. Temp files and write probes of killed writers are removed when
  this run opens its directory; a file committed but never indexed is deleted
  when a later save names another path; uncommitted checkpoint directories are
  deleted after the next committed one.
- End. `finish` adds the "training finished" mark (`storage.finished_mark`)
  to the index once the last commit is done, so a reader knows the records
  are final; the next save of the run (a restart) writes an index without it.

Saves can run in a background thread (`async_commit=True`): `save_file` and
`save_directory` return at once, the writing (which must write from a snapshot
of the state, `storage.snapshot.ModelSnapshot`) and the commit run in one
background thread,
at most one save in flight, and the next save (or `wait`) raises its error.

The manager does no I/O until `open`, and only the process that writes calls
`open`, `save_file`, `save_directory` and `wait`; other processes keep the same
records with `add`, which is pure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import re
import secrets
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from disttrain.errors import StorageConfigError, StorageError
from disttrain.storage.atomic import (
    StagedFile,
    probe_writable,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from disttrain.storage.fs import exists, join, listdir, remove
from disttrain.storage.manifest import (
    FINISHED_KEY,
    commit_checkpoint,
    finished_mark,
    is_committed,
    read_manifest,
    remove_committed,
)
from disttrain.storage.retention import Retention

PENDING_NAME = ".pending.json"
# Written into every index: tells a restart of the run (another process) from a later
# manager of this same process (a second `fit` in a notebook).
WRITER_ID = secrets.token_hex(8)
_MODES = ("min", "max", None)


def check_max_to_keep(max_to_keep: int | None, owner: str) -> None:
    """Raises unless `max_to_keep` is a positive integer or None (keep all).

    Args:
        max_to_keep: the value to check.
        owner: how the message names the caller, e.g. `"ModelCheckpoint"`.

    Raises:
        StorageConfigError: naming the bad value.

    Example:

    >>> check_max_to_keep(3, "ModelCheckpoint")
    """
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
        raise StorageConfigError(
            f"{owner}(max_to_keep={max_to_keep!r}): must be a positive integer "
            "or None (keep all). Fix: pass e.g. max_to_keep=3."
        )


class CheckpointManager:
    """Commits checkpoints into one directory, keeps the best or latest, cleans up after crashes.

    Records describe committed checkpoints: dicts with at least `path` (the
    checkpoint's URL) and, for single files, `epoch` and `value` (the monitored
    metric, or None); other keys are kept as they are. `checkpoints` holds the
    committed records, oldest first.

    Args:
        directory: the checkpoint directory (URL or local path).
        run_id: the run id written into the index and compared with it.
        max_to_keep: keep at most this many checkpoints; `None` keeps all.
        keep_best: retention keeps the best `value`s (by `mode`) instead of the
            latest checkpoints.
        retention: a `storage.Retention` policy instead of `max_to_keep` and
            `keep_best` (pass one or the other).
        mode: `"min"` or `"max"`: which `value` is best; `None` until known
            (then `best` is the latest, and `keep_best` ranks as `"min"`).
        index_name: the index file of single-file checkpoints (`save_file`);
            `None` for directory checkpoints (`save_directory`).
        step_prefix: name prefix of directory checkpoints.
        overwrite: allow replacing another run's checkpoints and files this
            run did not write.
        async_commit: write (from a snapshot) and commit checkpoints in a
            background thread.
        owner: how messages name the user of the manager, e.g. `"ModelCheckpoint"`.
        pending_name: the pending marker's file name; managers sharing a directory
            (each with its own `index_name`) need one each.

    Raises:
        StorageConfigError: when `max_to_keep` or `mode` is invalid, or both
            `max_to_keep` and `retention` are given.

    Example:

    ```python
    manager = CheckpointManager("gs://bucket/run-7", "run-7", max_to_keep=3,
                                keep_best=True, mode="min", index_name="best.json")
    manager.open()
    manager.save_file({"path": "gs://bucket/run-7/m-1.keras", "epoch": 1, "value": 0.4},
                      model.save)
    manager.wait()
    ```
    """

    def __init__(
        self,
        directory: str,
        run_id: str,
        *,
        max_to_keep: int | None = None,
        keep_best: bool = False,
        mode: str | None = None,
        index_name: str | None = None,
        step_prefix: str = "ckpt-",
        overwrite: bool = False,
        async_commit: bool = False,
        owner: str = "CheckpointManager",
        pending_name: str = PENDING_NAME,
        retention: Retention | None = None,
    ):
        check_max_to_keep(max_to_keep, owner)
        if retention is not None and max_to_keep is not None:
            raise StorageConfigError(
                f"{owner}: got both max_to_keep={max_to_keep!r} and retention={retention!r}. "
                "Fix: pass one: max_to_keep=k is Retention(latest=k), or Retention(best=k) "
                "for the best ones."
            )
        self.owner = owner
        self.directory = directory
        self.run_id = run_id
        self.retention = retention or Retention(
            **{"best" if keep_best else "latest": max_to_keep})
        self.mode = mode
        self.index_name = index_name
        self.step_prefix = step_prefix
        self.overwrite = overwrite
        self.async_commit = async_commit
        self.pending_name = pending_name
        self.checkpoints: list[dict[str, Any]] = []
        self._step_re = re.compile(rf"^{re.escape(step_prefix)}(\d{{6,}})$")
        self._next_step = 0
        self._stored: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: concurrent.futures.Future | None = None
        self._before_in_flight: tuple[list[dict[str, Any]], int] = ([], 0)

    @property
    def mode(self) -> str | None:
        return self._mode

    @mode.setter
    def mode(self, mode: str | None) -> None:
        if mode not in _MODES:
            raise StorageConfigError(
                f"{self.owner}(mode={mode!r}): must be 'min', 'max' or None. Fix: pass mode='min' "
                "for losses, mode='max' for accuracies."
            )
        self._mode = mode

    @property
    def index_url(self) -> str:
        """The URL of the index file (single-file checkpoints)."""
        return join(self.directory, self._require_index())

    @property
    def pending_url(self) -> str:
        """The URL of the pending marker (single-file checkpoints)."""
        return join(self.directory, self.pending_name)

    def open(self) -> dict[str, Any]:
        """Prepares the directory for this run's saves; call once, before the first save.

        Checks that the directory accepts writes. Single files: reads the index;
        refuses another run's (unless `overwrite`), removes the temp files and
        probes killed writers left (also without an index, unless another run's
        pending marker is there), and takes this run's records from it.
        Directories: takes the committed ones as records (another run's too:
        they are what a restarted job resumes from).

        Returns:
            This run's index ({} when there is none, or for directory checkpoints).

        Raises:
            StorageError: the directory is not writable, cannot be read, or holds
                another run's index without `overwrite`.
        """
        self.wait()
        self._stored = None
        probe_writable(self.directory)
        if self.index_name is None:
            self.checkpoints = [self._directory_record(name, step)
                                for name, step in self._steps() if self._committed(name)]
            self._next_step = self.checkpoints[-1]["step"] + 1 if self.checkpoints else 0
            return {}
        index = read_json(self.index_url)
        if index is None:
            # A writer killed in its first save leaves temp files and no index; keep
            # another run's first save in flight (its pending marker) untouched.
            pending = read_json(self.pending_url) or {}
            if pending.get("run_id", self.run_id) == self.run_id or self.overwrite:
                remove_stale_temporaries(self.directory)
            return {}
        ours = index.get("run_id") == self.run_id
        if ours or self.overwrite:
            remove_stale_temporaries(self.directory)
        if not ours and not self.overwrite:
            raise StorageError(
                f"{self.owner}: {self.directory!r} holds checkpoints of run "
                f"{index.get('run_id')!r} ({self.index_url}), this is run {self.run_id!r}. "
                "Refusing to mix or overwrite them. Fix: use a new directory, put {run_id} in "
                "the path, or pass overwrite=True."
            )
        if not ours:
            return {}
        self.checkpoints = list(index.get("checkpoints", []))
        return index

    @staticmethod
    def written_by_this_process(index: Mapping[str, Any]) -> bool:
        """Whether `index` (as `open` returned it) was written by this process, rather
        than by an earlier process of the run (a restart)."""
        return index.get("writer") == WRITER_ID

    def add(self, record: dict[str, Any]) -> None:
        """Records a committed checkpoint in memory, applying retention (no I/O).

        Processes that do not write call this to keep the same records as the
        writer; adding the same record twice changes nothing. A directory
        checkpoint's record (with its `step`) also moves `next_url` past it.
        """
        if "step" in record:
            self._next_step = max(self._next_step, record["step"] + 1)
        self.checkpoints = self.retained(
            [c for c in self.checkpoints if c["path"] != record["path"]] + [record]
        )[0]

    def retained(
        self, records: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Splits records (oldest first) into those `retention` keeps and those it drops.

        Example:

        >>> manager = CheckpointManager("memory://doc/m", "run", max_to_keep=1,
        ...                             keep_best=True, mode="max")
        >>> manager.retained([{"path": "a", "value": 0.9}, {"path": "b", "value": 0.7}])
        ([{'path': 'a', 'value': 0.9}], [{'path': 'b', 'value': 0.7}])
        """
        kept = self.retention.keep(records, self.mode)
        return kept, [c for c in records if c not in kept]

    def best(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The best record by `value` and `mode` (the latest when `mode` is None or no record
        has a value); None when there are none. Defaults to `checkpoints`."""
        records = self.checkpoints if records is None else records
        if not records:
            return None
        scored = [c for c in records if c.get("value") is not None]
        if not scored or self.mode is None:
            return records[-1]
        return (max if self.mode == "max" else min)(scored, key=lambda c: c["value"])

    def latest(self) -> str | None:
        """The URL of the newest committed checkpoint, or None."""
        return self.checkpoints[-1]["path"] if self.checkpoints else None

    def save_file(
        self,
        record: dict[str, Any],
        write: Callable[[str], None],
        metadata: Mapping[str, Any] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """Saves a single-file checkpoint at `record["path"]` and commits it.

        `write(local_path)` writes the checkpoint to a local temp file (with the
        destination's extensions). Then, in order: the pending marker (for a
        path the index does not list yet), the file (atomically), the index
        (the commit point: this run's records after retention, the best record's
        `path`, `epoch` and `value`, and `metadata`), the marker's removal, and
        the deletion of dropped files. With `async_commit`, `write` and
        everything after it run in a background thread and `save_file` returns
        at once: `write` must then write a snapshot taken before the call
        (`storage.snapshot.ModelSnapshot`), not state that changes after it.
        The previous save is always finished (or its error raised) first, so at
        most one is in flight. A save that fails leaves the directory as it was,
        but for its pending marker after a `StorageError` (what a crash there
        leaves; the next save removes it and the file it names).

        Args:
            record: the checkpoint's record; its `path` is the destination URL.
            write: writes the checkpoint to the local path it is given (in the
                background thread with `async_commit`).
            metadata: more JSON-serializable fields for the index.
            on_commit: called after the commit (in the background thread with
                `async_commit`).

        Raises:
            StorageError: the path holds a file this run did not write (without
                `overwrite`), or a write, the commit or the index failed.
        """
        self.wait()
        path = record["path"]
        index, pending = self._stored or self._read_stored()
        kept_before = {c.get("path") for c in index.get("checkpoints", [])}
        deleting_before = {p for p in index.get("deleting", []) if exists(p)}
        if pending.get("path") not in (None, path) and pending["path"] not in kept_before:
            remove(pending["path"])
        ours = (path in kept_before or path in deleting_before or pending.get("path") == path
                or any(c["path"] == path for c in self.checkpoints))
        if not self.overwrite and not ours and exists(path):
            raise StorageError(
                f"{self.owner}: {path!r} already exists and was not written by run "
                f"{self.run_id!r}. Refusing to overwrite it. Fix: use a new directory, put "
                "{run_id} or {epoch} in the path, or pass overwrite=True."
            )
        kept, dropped = self.retained(
            [c for c in self.checkpoints if c["path"] != path] + [record]
        )
        kept_paths = {c["path"] for c in kept}
        deleting = sorted(({c["path"] for c in dropped} | deleting_before) - kept_paths)
        new_index = {
            "run_id": self.run_id,
            **{key: self.best(kept).get(key) for key in ("path", "epoch", "value")},
            **(metadata or {}),
            "checkpoints": kept,
            "deleting": deleting,
            "written_at": time.time(),
            "writer": WRITER_ID,
        }
        commit = functools.partial(self._commit, path, write, path not in kept_before,
                                   pending, new_index, deleting, on_commit)
        self._run(path, commit)
        self.checkpoints = kept

    @property
    def next_url(self) -> str:
        """The URL of the directory the next `save_directory` commits (no I/O): other
        processes may write files into it first and pass them as `written`."""
        return join(self.directory, f"{self.step_prefix}{self._next_step:06d}")

    def damaged(self) -> list[str]:
        """Directory checkpoints newer than the latest committed one that have a
        manifest but are not committed (a listed file is missing or has another
        size). A crash cannot leave one (the manifest is written last): a file was
        deleted or changed after the commit, so a restart must not silently resume
        from an older checkpoint. Their URLs, oldest first.

        Raises:
            StorageError: when the storage cannot be read.
        """
        latest = self.checkpoints[-1]["step"] if self.checkpoints else -1
        return [join(self.directory, name) for name, step in self._steps()
                if step > latest and read_manifest(join(self.directory, name)) is not None]

    def save_directory(
        self, files: Mapping[str, str] | Callable[[str], Mapping[str, str]],
        metadata: Mapping[str, Any] | None = None,
        written: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> str:
        """Commits a directory checkpoint (the next step, `next_url`), then applies retention.

        The files go to `<directory>/<step_prefix><NNNNNN>/` with a manifest
        written last (`commit_checkpoint`). Afterwards every other
        `<step_prefix>*` entry that retention drops, or that was never
        committed (a crash mid-commit), is deleted, except the next step's
        (other processes may already be writing their files into it).
        With `async_commit`, writing the files and everything after it run in
        the background thread and `save_directory` returns at once (`files`
        must then be a function that writes a snapshot taken before the call);
        the previous save is always finished (or its error raised) first.

        Args:
            files: relative destination name -> local source path; or a function
                that writes the files into the local temp directory it is given
                and returns that mapping.
            metadata: JSON-serializable data for the checkpoint's manifest.
            written: files already in the directory, written by other processes
                (name -> `describe_bytes` of the content), listed in the manifest.

        Returns:
            The URL of the checkpoint directory (committed, or being committed).

        Raises:
            StorageError: when the commit or a deletion fails.
        """
        self.wait()
        url, step = self.next_url, self._next_step
        record = _record_of(url, step, metadata or {})
        kept = self.retained([c for c in self.checkpoints if c["path"] != url] + [record])[0]
        commit = functools.partial(self._commit_directory, url, step, files, metadata, written,
                                   {c["path"] for c in kept})
        self._run(url, commit)
        self._next_step = step + 1
        self.checkpoints = kept
        return url

    def _commit_directory(self, url: str, step: int,
                          files: Mapping[str, str] | Callable[[str], Mapping[str, str]],
                          metadata: Mapping[str, Any] | None,
                          written: Mapping[str, Mapping[str, Any]] | None,
                          kept: set[str]) -> None:
        """Writes (when `files` is a function) and commits the directory checkpoint `url`,
        then deletes the other step entries but the next one that `kept` does not name."""
        with tempfile.TemporaryDirectory(prefix="disttrain-checkpoint-") as tmp:
            commit_checkpoint(url, files(tmp) if callable(files) else files, metadata, written)
        for name, other in self._steps():
            if other not in (step, step + 1) and join(self.directory, name) not in kept:
                remove_committed(join(self.directory, name))

    def _run(self, path: str, commit: Callable[[], None]) -> None:
        """Runs `commit` now, or with `async_commit` in the background thread (then the
        records from before it are restored if it fails, see `wait`)."""
        if not self.async_commit:
            commit()
            return
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="disttrain-checkpoint-save")
        self._in_flight = self._committer.submit(self._in_background, path, commit)
        self._before_in_flight = (self.checkpoints, self._next_step)

    def finish(self, **details: Any) -> dict[str, Any]:
        """Marks this run's training as finished in the index (single-file checkpoints).

        Waits for the last commit, then writes the index again with the records
        as they are plus the mark (`storage.finished_mark(run_id, **details)`),
        in one atomic write: a reader that sees the mark sees the final records.
        A run that saved nothing gets an index with no checkpoints and the mark.

        Returns:
            The index written.

        Raises:
            StorageError: when the commit before or the write fails.

        Example:

        ```python
        manager.finish(epochs=12)
        ```
        """
        self.wait()
        index, _ = self._stored or self._read_stored()
        index = {"run_id": self.run_id, "checkpoints": [], **index,
                 FINISHED_KEY: finished_mark(self.run_id, checkpoints=len(self.checkpoints),
                                             **details)}
        write_json(self.index_url, index)
        self._stored = (index, {})
        return index

    def wait(self) -> None:
        """Waits for the background save in flight, if any, and raises its error (then
        `checkpoints` are the records from before that save again)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and in_flight.exception() is not None:
            self.checkpoints, self._next_step = self._before_in_flight
            in_flight.result()

    def _in_background(self, path: str, save: Callable[[], None]) -> None:
        """Runs `save` (write and commit) in the background thread; an error that is not a
        `StorageError` (the snapshot could not be serialized) becomes one naming `path`."""
        try:
            save()
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(
                f"{self.owner}: writing {path!r} in the background failed: "
                f"{type(e).__name__}: {e}. Nothing was committed; the previous checkpoint "
                "stays the latest. Fix: make the model savable (a synchronous model.save "
                "of it fails the same way)."
            ) from e

    def _commit(self, path: str, write: Callable[[str], None], claim: bool,
                pending: dict[str, Any], index: dict[str, Any], deleting: list[str],
                on_commit: Callable[[], None] | None) -> None:
        """Writes the checkpoint with `write` to a temp file and commits it to `path`, then
        the index, then deletes what was dropped.

        `claim`: write the pending marker first (the index does not list the path
        yet). `pending`: the marker found before this save ({} for none). After
        a failure the marker this save wrote is removed again (best effort: the
        original error is the one that matters); one that already named the
        same path, from a crash, is kept. After a `StorageError` it is kept too,
        as a crash there would leave it (the next save or `open` clears it):
        another call would meet the same failure, and on gs:// gcsfs retries
        each call before it gives up (docs/failures.md says how long).
        """
        self._stored = None
        staged = _stage(path, write)
        try:
            if claim:
                write_json(self.pending_url, {"run_id": self.run_id, "path": path})
            staged.commit()
        except BaseException as e:
            staged.discard()
            if claim and pending.get("path") != path and not isinstance(e, StorageError):
                with contextlib.suppress(StorageError):
                    remove(self.pending_url)
            raise
        write_json(self.index_url, index)
        if claim or pending:
            remove(self.pending_url)
        self._stored = (index, {})
        for old in deleting:
            try:
                remove(old)
            except StorageError as e:
                warnings.warn(
                    f"{self.owner}: could not delete {old!r}, which retention dropped "
                    f"({e}); the next save retries.",
                    stacklevel=2,
                )
        if on_commit is not None:
            on_commit()

    def _read_stored(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This run's index and pending marker as stored ({} for none, or for another
        run's). After a successful commit `_stored` holds them instead, so a save to
        an object store makes no reads; a failed commit clears it."""
        index = read_json(self.index_url) or {}
        pending = read_json(self.pending_url) or {}
        return ({} if index.get("run_id") != self.run_id else index,
                {} if pending.get("run_id") != self.run_id else pending)

    def _steps(self) -> list[tuple[str, int]]:
        """The directory checkpoints present, committed or not, as (name, step), by step."""
        found = [(n, int(m.group(1))) for n in listdir(self.directory)
                 if (m := self._step_re.match(n))]
        return sorted(found, key=lambda entry: entry[1])

    def _directory_record(self, name: str, step: int) -> dict[str, Any]:
        """The record of the committed directory checkpoint `name`, from its manifest."""
        url = join(self.directory, name)
        return _record_of(url, step, (read_manifest(url) or {}).get("metadata", {}))

    def _committed(self, name: str) -> bool:
        return is_committed(join(self.directory, name))

    def _require_index(self) -> str:
        if self.index_name is None:
            raise StorageError(
                f"{self.owner}: single-file checkpoints in {self.directory!r} need an index. "
                "Fix: create the CheckpointManager with index_name='...' (e.g. 'best.json')."
            )
        return self.index_name


# Manifest metadata a directory checkpoint's record carries, for retention rules.
_RECORD_FIELDS = ("epoch", "batches", "iterations", "time", "value")


def _record_of(url: str, step: int, metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {"path": url, "step": step,
            **{key: metadata[key] for key in _RECORD_FIELDS if key in metadata}}


def _stage(path: str, write: Callable[[str], None]) -> StagedFile:
    """Writes a checkpoint with `write` into a temp file that a `StagedFile` commit makes `path`."""
    staged = StagedFile(path)
    try:
        try:
            write(staged.path)
        except OSError as e:
            raise staged.writing_failed(e) from e
        staged.check_written()
    except BaseException:
        staged.discard()
        raise
    return staged
