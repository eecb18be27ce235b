"""Multi-file checkpoint directories: every file first, then a manifest as the commit marker.

A directory is trusted only when `is_committed` says so: its manifest
(`MANIFEST_NAME`, written last) exists and every file it lists has its size.

Also the "training finished" mark (`finished_mark`, `training_finished`): the
chief adds it to a checkpoint directory's commit record when training ends
normally, so a reader (the sidecar evaluator) knows that the record is final.
"""

from __future__ import annotations

import datetime
import hashlib
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec

from disttrain.errors import StorageError
from disttrain.storage.atomic import _json_bytes, atomic_upload, atomic_write_bytes, read_json
from disttrain.storage.fs import _COPY_CHUNK, _wrapped, join, remove, url_to_fs

MANIFEST_NAME = "disttrain_manifest.json"
MANIFEST_FORMAT = 1
FINISHED_KEY = "training_finished"


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


def describe_bytes(data: bytes) -> dict[str, Any]:
    """The manifest entry of a file holding `data`: its `size` and `sha256`.

    Example:

    >>> describe_bytes(b"{}")["size"]
    2
    """
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def commit_checkpoint(
    url_dir: str, files: Mapping[str, str], metadata: Mapping[str, Any] | None = None,
    written: Mapping[str, Mapping[str, Any]] | None = None,
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
        written: files other processes already wrote into `url_dir` (relative
            name -> `describe_bytes` of their content), listed in the manifest
            as they are.

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
    for name, entry in (written or {}).items():
        described[_check_relative_name(name, url_dir)] = {"size": int(entry["size"]),
                                                          "sha256": str(entry["sha256"])}
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


def remove_committed(url: str) -> None:
    """Deletes a directory tree that may hold committed checkpoint directories, each
    un-committed before anything else goes: every manifest under `url` is deleted first,
    then the rest. A delete that stops part-way (storage down, a kill, a file that cannot
    be deleted) so never leaves a manifest naming a deleted file: what is left is
    uncommitted, ignored and cleaned like a torn write. Missing is fine.

    Args:
        url: a checkpoint directory, or a directory of them.

    Raises:
        StorageError: when a delete fails (the manifests deleted so far stay deleted).

    Example:

    ```python
    remove_committed("gs://bucket/run/backup-000003")
    ```
    """
    fs, path = url_to_fs(url)
    with _wrapped("removing", url):
        fs.invalidate_cache(path)
        try:
            found = fs.find(path)
        except FileNotFoundError:
            found = []
    for manifest in found:
        if posixpath.basename(manifest) == MANIFEST_NAME:
            remove(join(url, posixpath.relpath(manifest, path.rstrip("/") or "/")))
    remove(url, recursive=True)


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


def check_files(url_dir: str, names: list[str] | None = None) -> str | None:
    """Reads files a checkpoint's manifest lists and compares them with it.

    Args:
        url_dir: checkpoint directory (with a manifest).
        names: the files to check; default every file the manifest lists.

    Returns:
        None when each file has its listed size and sha256, else what is wrong
        with the first one that does not (missing, not listed, another size or
        checksum).

    Raises:
        StorageError: when the manifest or the storage cannot be read.

    Example:

    ```python
    problem = check_files("gs://bucket/run/backup-000004", ["worker-1.json"])
    ```
    """
    manifest = read_manifest(url_dir)
    if manifest is None:
        return f"{url_dir!r} has no manifest"
    listed = manifest["files"]
    fs, path = url_to_fs(url_dir)
    for name in listed if names is None else names:
        if name not in listed:
            return f"{name} is not listed in its manifest"
        file_path = posixpath.join(path, name)
        with _wrapped("checking checkpoint file", join(url_dir, name)):
            fs.invalidate_cache(file_path)
            if _size(fs, file_path) is None:
                return f"{name} is missing"
            data = fs.cat_file(file_path)
        found = describe_bytes(data)
        if found["size"] != listed[name]["size"]:
            return (f"{name} holds {found['size']} bytes, its manifest lists "
                    f"{listed[name]['size']}")
        if "sha256" in listed[name] and found["sha256"] != listed[name]["sha256"]:
            return f"{name} does not match the sha256 its manifest lists (corrupted or edited)"
    return None


def finished_mark(run_id: str, **details: Any) -> dict[str, Any]:
    """The durable "training finished" mark, for a commit record (`FINISHED_KEY`).

    The chief writes it into the commit record of a checkpoint directory (the
    index of `CheckpointManager.finish`) in the same atomic write as the final
    list of checkpoints, so a reader that sees the mark also sees every
    checkpoint the run committed. A later save of the run (a restart) writes a
    record without it; a restarted run that has not saved yet still shows it.

    Args:
        run_id: the run that finished.
        **details: more JSON-serializable fields (e.g. `checkpoints`, the count).

    Returns:
        `{"run_id": ..., "at": <UTC ISO time>, **details}`.

    Example:

    >>> finished_mark("run-7", checkpoints=3)["checkpoints"]
    3
    """
    return {"run_id": run_id,
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(), **details}


def training_finished(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The "training finished" mark of a commit record, or None while training may go on.

    Args:
        record: a commit record as read (e.g. a `ModelCheckpoint` directory's
            `best.json`), or None when there is none yet.

    Example:

    >>> training_finished({"run_id": "run-7", "checkpoints": []})
    >>> training_finished({FINISHED_KEY: finished_mark("run-7")})["run_id"]
    'run-7'
    """
    mark = (record or {}).get(FINISHED_KEY)
    return mark if isinstance(mark, dict) else None
