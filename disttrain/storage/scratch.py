"""Local scratch directories private to one run and one worker."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from disttrain.cluster import validate_run_id
from disttrain.errors import StorageError
from disttrain.storage.fs import _wrapped, is_local, url_to_fs

_WORKER_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
