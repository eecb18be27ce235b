"""Durable reads, writes and deletes through fsspec, for checkpoints and logs.

This is the only module of disttrain that touches storage. It works on local
paths, `file://`, `memory://`, `gs://` (gcsfs), `s3://` (when s3fs is installed)
and any other fsspec URL, and it never imports TensorFlow or Keras.

Commit rules, so that a reader never sees a torn file:

- Local destinations: write a temp file in the *same* directory, flush, fsync,
  `os.replace` it over the destination, fsync the directory. A crash leaves the
  old or the new content, never a mix (a stray `.<name>.tmp-*` file at worst).
- Object stores (gs, s3, az, ...) and memory://: one whole-object upload
  (`pipe` / `put_file`), visible all at once. There is no rename: on GCS a
  rename is a copy plus a delete (not atomic, and ~33 s per object on the GCS
  emulator).
- Other fsspec backends (sftp, ftp, smb, hdfs, webdav, ...) stream into the
  destination, so they are not atomic; disttrain warns once per backend.
- Multi-file checkpoints: every file first, then a small JSON manifest
  (`MANIFEST_NAME`) last as the commit marker. Readers trust a checkpoint
  directory only when `is_committed` says so.

For `gs://` URLs, `STORAGE_EMULATOR_HOST` (the standard GCS emulator variable)
selects an emulator with anonymous access; otherwise gcsfs uses its default
credentials (Workload Identity, `GOOGLE_APPLICATION_CREDENTIALS`, ...).

Every failure is raised as `disttrain.errors.StorageError`, naming the URL, what
failed and how to fix it, chained to the original error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import importlib.util
import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from disttrain.cluster import validate_run_id
from disttrain.errors import StorageError

MANIFEST_NAME = "disttrain_manifest.json"
MANIFEST_FORMAT = 1
ENV_STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"

_GCS_PROTOCOLS = frozenset({"gs", "gcs"})
_OBJECT_STORE_PROTOCOLS = _GCS_PROTOCOLS | {
    "s3", "s3a", "az", "abfs", "abfss", "adl", "oss", "r2",
}
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Name prefix of the small files written to test that a destination accepts writes.
PROBE_PREFIX = ".disttrain-probe-"
_COPY_CHUNK = 8 * 1024 * 1024
_WORKER_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _protocols_of(url: str) -> list[str]:
    return [fsspec.utils.get_protocol(part) for part in url.split("::")]


def _fix_for(error: BaseException, url: str) -> str:
    code = getattr(error, "errno", None)
    if (
        isinstance(error, PermissionError)
        or code in (errno.EACCES, errno.EPERM, errno.EROFS)
        or getattr(error, "code", None) in (401, 403)
        or str(error).startswith("Forbidden")
    ):
        return (
            "check the permissions of the destination and the credentials this process "
            "uses (service account / Workload Identity / GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space on the destination or write somewhere with more room"
    if isinstance(error, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return (
            "a file and a directory clash on this path; remove the clashing entry "
            "or choose another path"
        )
    if isinstance(error, FileNotFoundError):
        if is_local(url):
            return "check that the path exists"
        return (
            "check the URL; if the bucket does not exist, create it "
            "(e.g. `gcloud storage buckets create gs://BUCKET`)"
        )
    return "check that the destination is reachable and that the URL is right, then retry"


def _error(action: str, url: str, error: BaseException) -> StorageError:
    detail = str(error) or type(error).__name__
    return StorageError(
        f"{action} {url!r} failed: {type(error).__name__}: {detail}. "
        f"Fix: {_fix_for(error, url)}."
    )


@contextlib.contextmanager
def _wrapped(action: str, url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        raise _error(action, url, e) from e


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolves a URL or local path to an fsspec filesystem and a path on it.

    For `gs://` URLs, sets `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` unless it is
    already set (before gcsfs is first imported), and honours
    `STORAGE_EMULATOR_HOST` with anonymous credentials.

    Args:
        url: a local path, or a URL such as `file:///ckpt`, `memory://ckpt`,
            `gs://bucket/ckpt` or `s3://bucket/ckpt`.

    Returns:
        `(fs, path)`: the filesystem and the path on it (absolute for local paths).

    Raises:
        StorageError: when the protocol is unknown or its fsspec backend package
            is not installed (the message names the package to install).

    Example:

    >>> fs, path = url_to_fs("memory://runs/mnist")
    >>> path
    '/runs/mnist'
    """
    protocols = _protocols_of(url)
    kwargs: dict[str, Any] = {}
    if _GCS_PROTOCOLS.intersection(protocols):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    emulator = os.environ.get(ENV_STORAGE_EMULATOR_HOST, "")
    if protocols[0] in _GCS_PROTOCOLS and emulator:
        if "://" not in emulator:
            emulator = f"http://{emulator}"
        kwargs = {"endpoint_url": emulator, "token": "anon"}
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as e:
        candidates = {
            known_implementations[p]["class"].split(".")[0]
            for p in protocols
            if p in known_implementations
        }
        packages = sorted(
            p for p in candidates if importlib.util.find_spec(p) is None
        ) or ["the fsspec backend for this protocol"]
        raise StorageError(
            f"cannot open {url!r}: the storage backend is not installed ({e}). "
            f"Fix: pip install {' '.join(packages)}."
        ) from e
    except ValueError as e:
        raise StorageError(
            f"cannot open {url!r}: {e}. Fix: use a local path or a URL with a protocol "
            "fsspec knows (file://, memory://, gs://, s3://, ...) and install its backend."
        ) from e


def is_local(url: str) -> bool:
    """True when `url` is a plain local path or a `file://` / `local://` URL.

    Example:

    >>> is_local("/tmp/ckpt"), is_local("file:///tmp/ckpt"), is_local("gs://b/ckpt")
    (True, True, False)
    """
    return _protocols_of(url) in (["file"], ["local"])


def join(url: str, *parts: str) -> str:
    """Joins path parts onto a URL or local path with single `/` separators.

    Args:
        url: the base, e.g. `gs://bucket/run`, `memory://`, `/tmp/run`.
        *parts: names to append; leading and trailing slashes are dropped.

    Returns:
        The joined URL (the base's protocol is kept).

    Example:

    >>> join("gs://bucket/run/", "ckpt-3", "model.keras")
    'gs://bucket/run/ckpt-3/model.keras'
    >>> join("memory://", "a")
    'memory://a'
    """
    stripped = url.rstrip("/")
    head = url if not stripped or stripped.endswith(":") else stripped
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return head
    return head + tail if head.endswith("/") else f"{head}/{tail}"


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    protocols = {protocol} if isinstance(protocol, str) else set(protocol)
    return bool(protocols & _OBJECT_STORE_PROTOCOLS)


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


def _default_suffix(url: str) -> str:
    name = posixpath.basename(url.rstrip("/")).lstrip(".")
    dot = name.find(".")
    return name[dot:] if dot >= 0 else ""


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

    def __init__(self, url: str, suffix: str | None = None):
        self.url = url
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
                    _commit_local(self.path, self._dest)
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


def _check_relative_name(name: str, url_dir: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "\\" in name
        or any(p in ("", ".", "..") for p in name.split("/"))
        or name == MANIFEST_NAME
    ):
        raise StorageError(
            f"committing checkpoint {url_dir!r} failed: {name!r} is not a valid file name. "
            f"Fix: use relative names like 'model.weights.h5' or 'sub/part-0' (no '..', "
            f"no leading '/', not {MANIFEST_NAME!r})."
        )
    return name


def _describe_local_file(local_path: str, url_dir: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with _wrapped(f"reading for checkpoint {url_dir!r} the local file", local_path):
        with open(local_path, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def commit_checkpoint(
    url_dir: str, files: Mapping[str, str], metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Commits a multi-file checkpoint: every file first, the manifest last.

    Local files are hashed before anything is written, so a missing source file
    changes nothing. An existing manifest in `url_dir` is removed before any
    file is overwritten, so a commit that fails half-way leaves the directory
    uncommitted rather than describing a mix of old and new files.

    Args:
        url_dir: destination directory (URL or local path).
        files: relative destination name -> local source path.
        metadata: JSON-serializable data stored in the manifest (epoch, metrics, ...).

    Returns:
        The manifest written to `join(url_dir, MANIFEST_NAME)`: `format`,
        `created` (UTC ISO time), `files` (name -> `size`, `sha256`), `metadata`.

    Raises:
        StorageError: on a bad name, an unreadable source file or a failed write.

    Example:

    ```python
    manifest = commit_checkpoint(
        "gs://bucket/run/ckpt-0005",
        {"model.weights.h5": "/tmp/scratch/model.weights.h5"},
        {"epoch": 5, "val_loss": 0.31},
    )
    ```
    """
    described = {
        _check_relative_name(name, url_dir): _describe_local_file(local_path, url_dir)
        for name, local_path in files.items()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "files": described,
        "metadata": dict(metadata or {}),
    }
    manifest_bytes = _json_bytes(manifest)
    remove(join(url_dir, MANIFEST_NAME))
    for name, local_path in files.items():
        atomic_upload(local_path, join(url_dir, name))
    atomic_write_bytes(join(url_dir, MANIFEST_NAME), manifest_bytes)
    return manifest


def read_manifest(url_dir: str) -> dict[str, Any] | None:
    """Reads the manifest of a checkpoint directory.

    Args:
        url_dir: checkpoint directory.

    Returns:
        The manifest dict, or `None` when the directory holds no manifest
        (never committed, or a commit in progress / interrupted).

    Raises:
        StorageError: when the manifest cannot be read or is malformed.

    Example:

    ```python
    manifest = read_manifest("gs://bucket/run/ckpt-0005")
    epoch = manifest["metadata"]["epoch"] if manifest else None
    ```
    """
    url = join(url_dir, MANIFEST_NAME)
    manifest = read_json(url)
    if manifest is None:
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()
    ):
        raise StorageError(
            f"reading {url!r} failed: not a disttrain manifest (needs a 'files' object "
            "mapping names to {'size': int, 'sha256': str}). Fix: remove the directory "
            "or write it again with commit_checkpoint."
        )
    return manifest


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return info.get("size") if info.get("type") == "file" else None


def is_committed(url_dir: str) -> bool:
    """True when `url_dir` has a manifest and every file it lists exists with its size.

    Args:
        url_dir: checkpoint directory.

    Raises:
        StorageError: when the storage cannot be queried.

    Example:

    ```python
    committed = [d for d in listdir(run) if is_committed(join(run, d))]
    ```
    """
    manifest = read_manifest(url_dir)
    if manifest is None:
        return False
    fs, path = url_to_fs(url_dir)
    with _wrapped("checking checkpoint", url_dir):
        for name, entry in manifest["files"].items():
            file_path = posixpath.join(path, name)
            fs.invalidate_cache(file_path)
            if _size(fs, file_path) != entry["size"]:
                return False
    return True


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


def exists(url: str) -> bool:
    """True when a file or directory exists at `url`.

    Example:

    >>> exists("memory://doc/nothing-here")
    False
    """
    fs, path = url_to_fs(url)
    with _wrapped("checking", url):
        fs.invalidate_cache(path)
        return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """Reads a whole file.

    Raises:
        StorageError: when it does not exist or cannot be read.

    Example:

    ```python
    data = read_bytes("gs://bucket/run/ckpt-0005/model.weights.h5")
    ```
    """
    fs, path = url_to_fs(url)
    with _wrapped("reading", url):
        return fs.cat_file(path)


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


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """Gives a local path holding the content of `url`, for readers that need a file.

    A local `url` is yielded as is; anything else is downloaded into a private
    temp file (keeping the name's extensions, which Keras uses to pick the
    format) that is removed on exit.

    Raises:
        StorageError: when `url` does not exist or cannot be read.

    Example:

    ```python
    with local_copy("gs://bucket/run/backup-000004/model.weights.h5") as path:
        model.load_weights(path)
    ```
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise StorageError(
                f"reading {url!r} failed: no such file. Fix: check the path."
            )
        yield path
        return
    tmp_dir = tempfile.mkdtemp(prefix="disttrain-download-")
    try:
        local = os.path.join(tmp_dir, f"download{_default_suffix(url)}")
        with _wrapped("downloading", url):
            fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def listdir(url_dir: str) -> list[str]:
    """Names (not paths) of the entries in a directory, sorted; `[]` when it is missing.

    Example:

    ```python
    checkpoints = [n for n in listdir("gs://bucket/run") if n.startswith("ckpt-")]
    ```
    """
    fs, path = url_to_fs(url_dir)
    with _wrapped("listing", url_dir):
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    own = path.rstrip("/")
    return sorted(
        posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != own
    )


def remove(url: str, recursive: bool = False) -> None:
    """Deletes a file (or, with `recursive=True`, a directory tree); missing is fine.

    Raises:
        StorageError: when the delete fails for any other reason.

    Example:

    ```python
    remove("gs://bucket/run/ckpt-0001", recursive=True)
    ```
    """
    fs, path = url_to_fs(url)
    with _wrapped("removing", url):
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass


def scratch_dir(run_id: str, worker_label: str, base: str | None = None) -> str:
    """Creates and returns a local scratch directory private to this run and worker.

    The directory is `<base>/<run_id>/<worker_label>-<pid>`, with `base`
    defaulting to `<tempfile.gettempdir()>/disttrain-scratch`: local, and off
    any shared checkpoint destination.

    Args:
        run_id: the run id shared by all workers (see `disttrain.cluster`).
        worker_label: this worker's label, e.g. `Cluster.label` (`chief`, `w3`).
        base: a local directory to put scratch directories in.

    Raises:
        ClusterConfigError: when `run_id` is not a valid run id.
        StorageError: when `worker_label` or `base` is unusable, or the
            directory cannot be created.

    Example:

    ```python
    path = scratch_dir(cluster.run_id, cluster.label)
    ```
    """
    validate_run_id(run_id)
    if not isinstance(worker_label, str) or not _WORKER_LABEL_RE.match(worker_label):
        raise StorageError(
            f"scratch directory for worker label {worker_label!r} failed: not a safe "
            "path component. Fix: use a label like 'chief' or 'w3' (Cluster.label)."
        )
    if base is not None and not is_local(base):
        raise StorageError(
            f"scratch directory under {base!r} failed: scratch space must be local. "
            "Fix: pass a local directory as base (or None for the system temp directory)."
        )
    root = (
        url_to_fs(base)[1]
        if base is not None
        else os.path.join(tempfile.gettempdir(), "disttrain-scratch")
    )
    path = os.path.join(root, run_id, f"{worker_label}-{os.getpid()}")
    with _wrapped("creating scratch directory", path):
        os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def scratch(run_id: str, worker_label: str, base: str | None = None) -> Iterator[str]:
    """Context manager around `scratch_dir` that removes the directory on exit, even on error.

    The run-level parent directory is removed too once no worker uses it.

    Example:

    ```python
    with scratch(cluster.run_id, cluster.label) as tmp:
        model.save(os.path.join(tmp, "model.keras"))
    ```
    """
    path = scratch_dir(run_id, worker_label, base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
