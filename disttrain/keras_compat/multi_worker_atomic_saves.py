"""Fix `multi_worker_atomic_saves`: every worker's `model.save(path)` writes a whole file.

Under multi-worker training every worker runs the script, so a `model.save("model.keras")`
or `model.save_weights("model.weights.h5")` after `fit` runs on every worker at once. Keras
writes a local path in place, so on a file system the workers share (one machine under
`launch.local`, NFS, a shared volume) they write into the same file together. Measured here
(keras 3.15.1, 2 workers, 50 MB model, 20 saves each): 9 of 20 `.keras` files were corrupt
(`config.json` fails its CRC) with every worker exiting 0; `save_weights` crashed one worker
with HDF5's `unable to lock file` after training and left a file h5py cannot open.

Under multi-worker only, Keras's writes of a local `.keras`, `.weights.h5` or legacy `.h5`
file go to a temp file of each worker's own in the destination directory, renamed over the
destination when complete (`disttrain.storage.StagedFile(durable=False)`): each worker
still writes its file, as in Keras, but a reader sees one worker's whole file (the workers'
weights are the same), never a mix, and a save that fails leaves the previous file as it was
and raises what Keras raises (a full disk: `OSError`). A path that is a symbolic link is
written where it points, as Keras does.
Remote paths are left to Keras (it uploads the whole object at once); so are directories
(`zipped=False`), sharded weights (`max_shard_size`), open files, and a destination
directory that does not exist (Keras's own error). One process is untouched. To write once,
on the chief only, use `disttrain.callbacks.ModelCheckpoint` or test `Cluster.is_chief`.
See `docs/keras_compat.md#multi_worker_atomic_saves`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

from disttrain.keras_compat import _patch, detection

NAME = "multi_worker_atomic_saves"
UPSTREAM = ("tensorflow/tensorflow#38635 (every worker's model.save writes the same path); "
            "measured here (keras 3.15.1): 9 of 20 concurrent saves corrupt")

# (module, function, the argument holding the path, the in-place write it contains, whether
# it creates a missing directory)
_TARGETS = (
    ("keras.src.saving.saving_lib", "save_model", "filepath", 'open(filepath, "wb")', False),
    ("keras.src.saving.saving_lib", "save_weights_only", "filepath",
     'H5IOStore(filepath, mode="w")', False),
    ("keras.src.legacy.saving.legacy_h5_format", "save_model_to_hdf5", "filepath",
     'h5py.File(filepath, mode="w")', True),
)


def _defective() -> list[tuple[Any, str, str, bool]]:
    """(module, function, path argument, creates directory) of each target that writes its
    path in place.

    Raises:
        detection.TargetNotFound: a target function is missing.
    """
    found = []
    for module_name, name, argument, write, creates_directory in _TARGETS:
        module = importlib.import_module(module_name)
        if detection.source_contains(detection.find(module, name), write):
            found.append((module, name, argument, creates_directory))
    return found


def is_needed() -> bool:
    """Whether Keras writes a local model or weights file in place.

    Raises:
        detection.TargetNotFound: one of Keras's save functions is missing.
    """
    return bool(_defective())


def install() -> None:
    """Wraps each of Keras's save functions that writes its local path in place."""
    for module, name, argument, creates_directory in _defective():
        _patch.wrap(module, name, functools.partial(
            _staged, argument=argument, creates_directory=creates_directory), by=NAME)


def _staged(save: Callable[..., Any], argument: str,
            creates_directory: bool) -> Callable[..., Any]:
    signature = inspect.signature(save)

    @functools.wraps(save)
    def wrapper(model, *args, **kwargs):
        bound = signature.bind(model, *args, **kwargs)
        path = bound.arguments[argument]
        if not _stages(model, path, bound.arguments, creates_directory):
            return save(model, *args, **kwargs)
        from disttrain.storage import StagedFile

        # Keras writes through a symbolic link; the rename replaces what it points to.
        staged = StagedFile(os.path.realpath(path), durable=False)
        try:
            bound.arguments[argument] = staged.path
            # Keras's own errors (a full disk: OSError) pass as they are, as without the fix.
            result = save(*bound.args, **bound.kwargs)
            staged.commit()
            return result
        finally:
            staged.discard()

    return wrapper


def _stages(model: Any, path: Any, arguments: dict[str, Any], creates_directory: bool) -> bool:
    """Whether this save goes through a temp file: a local file path of a multi-worker model,
    written whole (not a directory or shards), into a directory that exists unless the
    writer creates it (Keras's legacy `.h5` writer does)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if not isinstance(text, str) or arguments.get("zipped", True) is False:
        return False
    if arguments.get("max_shard_size") is not None:
        return False
    from keras.src.utils import file_utils  # private: keras.src

    if text.startswith("hf://") or file_utils.is_remote_path(text):
        return False
    directory = os.path.dirname(os.path.abspath(text))
    if not creates_directory and not os.path.isdir(directory):
        return False
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and detection.is_multi_worker(strategy)
