"""Atomic files: a reader sees the old content or the new one, never a torn file.

- Local destinations: write a temp file in the *same* directory, flush, fsync,
  `os.replace` it over the destination, fsync the directory. A crash leaves the
  old or the new content, never a mix (a stray `.<name>.tmp-*` file at worst,
  which `remove_stale_temporaries` deletes).
- Object stores (gs, s3, az, ...) and memory://: one whole-object upload
  (`pipe` / `put_file`), visible all at once. There is no rename: on GCS a
  rename is a copy plus a delete (not atomic, and slow on the GCS emulator).
- Other fsspec backends (sftp, ftp, smb, hdfs, webdav, ...) stream into the
  destination, so they are not atomic; disttrain warns once per backend.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from disttrain.errors import StorageError
from disttrain.storage.fs import (
    _COPY_CHUNK,
    _default_suffix,
    _error,
    _fix_for,
    _is_object_store,
    _wrapped,
    join,
    listdir,
    remove,
    url_to_fs,
)

# Name prefix of the small files written to test that a destination accepts writes.
PROBE_PREFIX = ".disttrain-probe-"


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{16}")


def _local_temp_path(path: str, suffix: str = "") -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}{suffix}")


def _commit_local(tmp: str, path: str) -> None:
    """fsyncs the finished same-directory temp file `tmp` and renames it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _rename_durably(tmp, path)


def _rename_durably(tmp: str, path: str) -> None:
    """Renames the durable temp file `tmp` over `path` and makes the rename durable."""
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _local_replace(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a same-directory temp file with `write` and commits it over `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _local_temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _rename_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remote_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Creates the parent directory on backends that have real directories."""
    if not _is_object_store(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)


_warned_in_place: set[str] = set()


def _warn_if_written_in_place(fs: fsspec.AbstractFileSystem, url: str) -> None:
    """Warns once per backend that is neither an object store nor memory://.

    Object stores make a whole-object upload visible at once; other fsspec
    backends (sftp, ftp, smb, hdfs, webdav, ...) stream into the destination, so
    a crash mid-write can leave a torn file there.
    """
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if _is_object_store(fs) or protocol == "memory" or protocol in _warned_in_place:
        return
    _warned_in_place.add(protocol)
    warnings.warn(
        f"storage: {protocol}:// writes in place (e.g. {url!r}); a crash during a write can "
        "leave a torn file. disttrain's writes are atomic on local disks and object stores "
        "(gs://, s3://, az://...). Fix: write checkpoints to one of those.",
        stacklevel=3,
    )


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Writes `data` to `url` so that readers see the old or the new content, never a mix.

    Local: temp file in the same directory, fsync, `os.replace`, fsync of the
    directory. Elsewhere: one whole-object `pipe`. Parent directories are
    created as needed (object stores have none to create).

    Args:
        url: destination file.
        data: the complete new content.

    Raises:
        StorageError: when the write fails (permissions, no space, missing bucket, ...).

    Example:

    >>> atomic_write_bytes("memory://doc/a.txt", b"hello")
    >>> from disttrain.storage import read_bytes
    >>> read_bytes("memory://doc/a.txt")
    b'hello'
    """
    fs, path = url_to_fs(url)
    with _wrapped("writing", url):
        if isinstance(fs, LocalFileSystem):
            _local_replace(path, lambda f: f.write(data))
        else:
            _warn_if_written_in_place(fs, url)
            _remote_parent(fs, path)
            fs.pipe_file(path, data)


def atomic_upload(local_path: str, url: str) -> None:
    """Commits a complete local file to `url` atomically.

    Local destination: copy into a same-directory temp file, fsync, `os.replace`.
    Elsewhere: one whole-object `put_file`. `local_path` is left in place.

    Args:
        local_path: an existing, complete local file.
        url: destination file.

    Raises:
        StorageError: when `local_path` cannot be read or the destination cannot
            be written.

    Example:

    ```python
    atomic_upload("/tmp/scratch/model.keras", "gs://bucket/run/model.keras")
    ```
    """
    fs, path = url_to_fs(url)
    with _wrapped(f"opening for upload to {url!r} the local file", local_path):
        src = open(local_path, "rb")
    with src, _wrapped(f"uploading {local_path!r} to", url):
        if isinstance(fs, LocalFileSystem):
            _local_replace(path, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))
        else:
            _warn_if_written_in_place(fs, url)
            _remote_parent(fs, path)
            fs.put_file(local_path, path)


def _discard(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class StagedFile:
    """A local temp file that becomes `url`, atomically, when committed.

    Writing and committing are separate steps, so a caller can write in one
    thread and commit in another (`ModelCheckpoint(async_commit=True)`). For a
    local `url` the temp file lives in the destination directory and the commit
    is an fsync plus `os.replace`; otherwise it is local staging space and the
    commit is one whole-object upload (`atomic_upload`). Until `commit`
    succeeds, `url` is untouched. Most callers want the `atomic_local_file`
    context manager instead.

    Args:
        url: destination file.
        suffix: required ending of the temp file name. Defaults to the
            destination name's extensions (`model.weights.h5` -> `.weights.h5`),
            so writers that pick the format from the name (Keras) work.
        durable: for a local `url`, fsync the file and the directory around the
            rename (the default). False renames only: concurrent writers and
            readers still never see a torn file, but a power loss may lose the
            new content, as with a plain write.

    Raises:
        StorageError: when the temp file cannot be prepared.

    Example:

    ```python
    staged = StagedFile("gs://bucket/run/model.keras")
    try:
        model.save(staged.path)
        staged.check_written()
    except BaseException:
        staged.discard()
        raise
    threading.Thread(target=staged.commit).start()   # discards itself when done
    ```
    """

    def __init__(self, url: str, suffix: str | None = None, durable: bool = True):
        self.url = url
        self._durable = durable
        fs, self._dest = url_to_fs(url)
        self._local_dest = isinstance(fs, LocalFileSystem)
        suffix = _default_suffix(url) if suffix is None else suffix
        self._tmp_dir: str | None = None
        with _wrapped("preparing a temp file for", url):
            if self._local_dest:
                os.makedirs(os.path.dirname(self._dest), exist_ok=True)
                self.path = _local_temp_path(self._dest, suffix)
            else:
                self._tmp_dir = tempfile.mkdtemp(prefix="disttrain-upload-")
                self.path = os.path.join(self._tmp_dir, f"upload{suffix}")

    def writing_failed(self, error: OSError) -> StorageError:
        """The error to raise when writing `path` raised `error` (no space, permissions):
        it names the destination, and for a remote one, the local staging space."""
        return _staging_error(self.url, self.path, self._local_dest, error)

    def check_written(self) -> None:
        """Raises StorageError unless a single file was written to `path`."""
        if not os.path.isfile(self.path):
            raise StorageError(
                f"committing {self.url!r} failed: nothing was written to the temp file "
                f"{self.path!r} (or a directory was written). Fix: write a single file to the "
                "path that atomic_local_file yields."
            )

    def commit(self) -> None:
        """Makes the written file `url`, then removes the temp file (also on failure)."""
        try:
            self.check_written()
            if self._local_dest:
                with _wrapped("committing", self.url):
                    if self._durable:
                        _commit_local(self.path, self._dest)
                    else:
                        os.replace(self.path, self._dest)
            else:
                atomic_upload(self.path, self.url)
        finally:
            self.discard()

    def discard(self) -> None:
        """Removes the temp file (and staging directory); `url` is left untouched."""
        _discard(self.path)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_local_file(url: str, suffix: str | None = None) -> Iterator[str]:
    """Gives a local temp file path to write into, committed to `url` on clean exit.

    The yielded path does not exist yet and ends with `suffix`, so writers that
    pick the format from the file name (Keras: `.keras`, `.weights.h5`) work.
    On a clean exit the file is committed atomically: for a local `url` the temp
    file lives in the destination directory and the commit is an fsync plus
    `os.replace`; otherwise it is uploaded with `atomic_upload`. On an exception
    the temp file is removed and `url` is left untouched. (`StagedFile` splits
    the write from the commit.)

    Args:
        url: destination file.
        suffix: required ending of the temp file name. Defaults to the
            destination name's extensions (`model.weights.h5` -> `.weights.h5`).

    Yields:
        The local path to write.

    Raises:
        StorageError: when nothing was written to the path, the commit fails, or
            writing the temp file raised an `OSError` (no space, permissions...;
            other exceptions of the writer pass through unchanged).

    Example:

    ```python
    with atomic_local_file("gs://bucket/run/model.keras") as path:
        model.save(path)
    ```
    """
    staged = StagedFile(url, suffix)
    try:
        try:
            yield staged.path
        except StorageError:
            raise
        except OSError as e:
            raise staged.writing_failed(e) from e
        staged.commit()
    finally:
        staged.discard()


def _staging_error(url: str, tmp: str, local_dest: bool, error: OSError) -> StorageError:
    """The error for a writer that failed to write the temp file of `atomic_local_file`.

    Such a failure (e.g. ENOSPC from Keras or h5py) happens before the commit, so
    it names the destination; for a remote destination the temp file is local
    staging space, and the fix points there.
    """
    if local_dest:
        return _error("writing", url, error)
    detail = str(error) or type(error).__name__
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        fix = (f"free space in the local temp directory {os.path.dirname(os.path.dirname(tmp))!r} "
               "or set TMPDIR to a disk with more room")
    else:
        fix = _fix_for(error, tmp)
    return StorageError(
        f"writing {url!r} failed: staging it in the local temp file {tmp!r} raised "
        f"{type(error).__name__}: {detail}. Fix: {fix}."
    )


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json(url: str, obj: Any) -> None:
    """Atomically writes `obj` as JSON to `url`.

    Args:
        url: destination file.
        obj: a JSON-serializable object.

    Raises:
        TypeError: when `obj` is not JSON-serializable (nothing is written).
        StorageError: when the write fails.

    Example:

    >>> write_json("memory://doc/state.json", {"epoch": 3})
    >>> read_json("memory://doc/state.json")
    {'epoch': 3}
    """
    atomic_write_bytes(url, _json_bytes(obj))


def read_json(url: str) -> Any | None:
    """Reads a JSON file; `None` when it does not exist.

    Raises:
        StorageError: when it cannot be read or is not valid JSON.

    Example:

    >>> read_json("memory://doc/missing.json") is None
    True
    """
    fs, path = url_to_fs(url)
    with _wrapped("reading", url):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(
            f"reading {url!r} failed: not valid JSON ({e}). "
            "Fix: remove the file or write it again with write_json."
        ) from e


def probe_writable(url_dir: str) -> None:
    """Checks that `url_dir` accepts writes and deletes, by writing a tiny probe object.

    The probe `.disttrain-probe-<random>` is written the way real commits are
    (creating `url_dir` if needed) and removed again.

    Args:
        url_dir: destination directory (URL or local path).

    Raises:
        StorageError: `destination ... is not writable: <original error>. Fix: ...`.

    Example:

    ```python
    probe_writable("gs://bucket/run")  # before the first epoch, not after it
    ```
    """
    url = join(url_dir, f"{PROBE_PREFIX}{secrets.token_hex(8)}")
    try:
        atomic_write_bytes(url, b"disttrain write probe\n")
        remove(url)
    except StorageError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise StorageError(
            f"destination {url_dir!r} is not writable: {type(cause).__name__}: {cause}. "
            f"Fix: {_fix_for(cause, url_dir)}."
        ) from cause


def remove_stale_temporaries(url_dir: str) -> list[str]:
    """Deletes what killed writers left in `url_dir`: temp files of atomic writes and probes.

    A process killed in the middle of an atomic local write leaves its temp file
    (`.<name>.tmp-<16 hex>...`, up to a whole checkpoint in size) beside the
    destination; the destination itself is intact. Call this only on a directory
    no other process is writing to.

    Returns:
        The names removed.

    Example:

    ```python
    remove_stale_temporaries("/data/run-7/checkpoints")
    ```
    """
    stale = [n for n in listdir(url_dir) if _TEMP_RE.match(n) or n.startswith(PROBE_PREFIX)]
    for name in stale:
        remove(join(url_dir, name))
    return stale
