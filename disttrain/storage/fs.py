"""Filesystems, paths and errors: every storage call of disttrain goes through here.

Works on local paths, `file://`, `memory://`, `gs://` (gcsfs), `s3://` (when
s3fs is installed) and any other fsspec URL, and never imports TensorFlow or
Keras. For `gs://` URLs, `STORAGE_EMULATOR_HOST` (the standard GCS emulator
variable) selects an emulator with anonymous access; otherwise gcsfs uses its
default credentials (Workload Identity, `GOOGLE_APPLICATION_CREDENTIALS`, ...).

Every failure is raised as `disttrain.errors.StorageError`, naming the URL, what
failed and how to fix it, chained to the original error.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from disttrain.errors import StorageError

ENV_STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"

_GCS_PROTOCOLS = frozenset({"gs", "gcs"})
_OBJECT_STORE_PROTOCOLS = _GCS_PROTOCOLS | {
    "s3", "s3a", "az", "abfs", "abfss", "adl", "oss", "r2",
}
_COPY_CHUNK = 8 * 1024 * 1024


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


def _default_suffix(url: str) -> str:
    name = posixpath.basename(url.rstrip("/")).lstrip(".")
    dot = name.find(".")
    return name[dot:] if dot >= 0 else ""


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


@contextlib.contextmanager
def local_copy(url: str, private: bool = False) -> Iterator[str]:
    """Gives a local path holding the content of `url`, for readers that need a file.

    A local `url` is yielded as is, or with `private=True` as a hard link (a
    copy where linking fails) in a private temp directory: a writer that replaces
    or deletes `url` meanwhile (a newer checkpoint, retention) does not change
    what the reader sees. Anything else is downloaded into a private temp file.
    Private files keep the name's extensions, which Keras uses to pick the
    format, and are removed on exit.

    Raises:
        StorageError: when `url` does not exist or cannot be read.

    Example:

    ```python
    with local_copy("gs://bucket/run/backup-000004/model.weights.h5") as path:
        model.load_weights(path)
    ```
    """
    fs, path = url_to_fs(url)
    local_file = isinstance(fs, LocalFileSystem)
    if local_file and not os.path.isfile(path):
        raise StorageError(
            f"reading {url!r} failed: no such file. Fix: check the path."
        )
    if local_file and not private:
        yield path
        return
    tmp_dir = tempfile.mkdtemp(prefix="disttrain-download-")
    try:
        local = os.path.join(tmp_dir, f"download{_default_suffix(url)}")
        with _wrapped("downloading" if not local_file else "linking", url):
            if not local_file:
                fs.get_file(path, local)
            else:
                try:
                    os.link(path, local)
                except OSError as e:  # another device, or a file system without hard links
                    if e.errno == errno.ENOENT:
                        raise
                    shutil.copyfile(path, local)
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
