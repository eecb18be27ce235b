"""Snapshot, then write: a Keras model's saved state copied to host memory, serialized later.

`ModelSnapshot.take(model)` runs Keras's own saving traversal
(`keras.src.saving.saving_lib`: every layer's and the optimizer's
`save_own_variables`, every `save_assets`) into a store that records what Keras
would write instead of writing it, and serializes the config as Keras does.
`write(path)` later, in any thread, writes the `.keras` archive (metadata,
config, `model.weights.h5`, assets) or the `.weights.h5` file from those
records through Keras's own `H5IOStore`, so `keras.saving.load_model` /
`load_weights` read it exactly as a synchronous `model.save` of the same step.

What is recorded and what it costs the training thread:

- A variable's value is read once (`tf.convert_to_tensor`): TensorFlow's
  `ReadVariableOp` returns a tensor that later writes never change (the next
  optimizer update copies the buffer instead of changing it in place), so the
  read is the snapshot and costs no copy here; a value on an accelerator is
  copied to host memory at once.
- Keras's optimizers store `variable.numpy()`, a copy (about 2/3 of the state
  with Adam). For an optimizer that keeps Keras's own `save_own_variables`, the
  snapshot hands the store the variables themselves (same values, same file),
  read as above without a copy.
- Any other NumPy array is kept as it is when nothing else references it (a
  fresh result), and copied otherwise (a layer that stores an array it keeps
  and may change later).
- Copy-on-write moves the copy, it does not remove it: the first optimizer step
  after a snapshot copies each variable it updates once, inside that step
  (`docs/checkpoints.md` measures it).
- Assets (lookup-layer vocabularies) are written by Keras into a local temp
  directory at once; they are small.

Host memory: one copy of the model's saved state (weights, optimizer state and
assets) per snapshot, released when `write` is done (or `discard` is called).
This is the one module of `disttrain.storage` that imports Keras and
TensorFlow; import it directly (`from disttrain.storage.snapshot import
ModelSnapshot`), `disttrain.storage` does not.

Example:

```python
snapshot = ModelSnapshot.take(model)      # training may go on from here
snapshot.write("/tmp/model.keras")        # what model.save wrote at the snapshot's step
```
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import weakref
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.saving import saving_lib


class _Probe:
    def __setitem__(self, key: str, value: Any) -> None:
        self.count = sys.getrefcount(value)


def _temporary_count() -> int:
    probe = _Probe()
    probe["k"] = np.empty(1)
    return probe.count


# References a fresh temporary (`store[k] = v.numpy()`) has inside `__setitem__`; an
# array the caller also keeps elsewhere has more.
_TEMPORARY_REFS = _temporary_count()


def _frozen(value: Any, refs: int) -> Any:
    """The value to keep for a store entry: immutable, in host memory, not shared with
    anything training changes."""
    if isinstance(value, np.ndarray):
        return value if refs <= _TEMPORARY_REFS and value.flags.owndata else value.copy()
    if isinstance(value, (np.generic, int, float, bool, str, bytes)):
        return value
    tensor = tf.convert_to_tensor(value)
    if "CPU" not in tensor.device.upper():
        return tensor.numpy()
    return tensor


class _RecordingStore(saving_lib.H5IOStore):
    """Takes Keras's writes of a model's state (`make`, `store[key] = value`) and keeps
    them in memory, in order, for `_replay` into a real `H5IOStore`. It is an
    `H5IOStore` only so that `saving_lib._save_state` accepts it; it opens no file."""

    def __init__(self):  # noqa: D107 - no file: see the class docstring
        self.mode = "w"
        self.entries: list[tuple[str, dict | None, list[tuple[str, Any]]]] = []

    def __bool__(self) -> bool:
        return True

    def make(self, path, metadata=None):
        self.entries.append((path, metadata, []))
        return self

    def __setitem__(self, key, value):
        self.entries[-1][2].append((key, _frozen(value, sys.getrefcount(value))))

    def close(self):
        self.entries = []

    def nbytes(self) -> int:
        """Bytes of the recorded values."""
        return sum(v.shape.num_elements() * v.dtype.size if isinstance(v, tf.Tensor)
                   else np.asarray(v).nbytes
                   for _, _, items in self.entries for _, v in items)

    def replay(self, store: saving_lib.H5IOStore) -> None:
        """Writes the recorded entries into `store` as Keras wrote them."""
        for path, metadata, items in self.entries:
            entry = store.make(path, metadata=metadata)
            for key, value in items:
                entry[key] = np.asarray(value) if isinstance(value, tf.Tensor) else value


def _store_variables(optimizer, store) -> None:
    """`BaseOptimizer.save_own_variables` with the variables instead of `.numpy()` copies."""
    for i, variable in enumerate(optimizer.variables):
        store[str(i)] = variable


@contextlib.contextmanager
def _optimizers_without_copies(model) -> Iterator[None]:
    """While a snapshot records `model`, its optimizer (when it keeps Keras's own
    `save_own_variables`) stores its variables rather than copies of them."""
    optimizer = getattr(model, "optimizer", None)
    own = (isinstance(optimizer, BaseOptimizer) and "save_own_variables" not in vars(optimizer)
           and type(optimizer).save_own_variables is BaseOptimizer.save_own_variables)
    if own:
        optimizer.save_own_variables = lambda store: _store_variables(optimizer, store)
    try:
        yield
    finally:
        if own:
            del optimizer.save_own_variables


class ModelSnapshot:
    """A Keras model's saved state at one step, in host memory, that writes the file later.

    Use `take`; see the module docstring for what is copied and what it costs.

    Args:
        weights: the recorded weight entries.
        assets: the asset store Keras wrote into (None for weights only).
        config: the `(config.json, metadata.json)` texts (None for weights only).

    Example:

    ```python
    snapshot = ModelSnapshot.take(model, weights_only=True)
    threading.Thread(target=snapshot.write, args=("/tmp/m.weights.h5",)).start()
    ```
    """

    def __init__(self, weights: _RecordingStore, assets: saving_lib.DiskIOStore | None,
                 config: tuple[str, str] | None):
        self._weights = weights
        self._assets = assets
        self._config = config
        if assets is not None:  # a snapshot dropped unwritten leaves no temp directory
            weakref.finalize(self, shutil.rmtree, assets.tmp_dir, ignore_errors=True)

    @classmethod
    def take(cls, model, weights_only: bool = False) -> ModelSnapshot:
        """Records `model`'s state (and config, unless `weights_only`) as `model.save` /
        `model.save_weights` would write it now.

        Raises:
            ValueError: when Keras refuses to save the model (e.g. not built).
        """
        if weights_only and not model.built:
            raise ValueError("You are saving a model that has not yet been built. Try "
                             "building the model first by calling it on some data.")
        weights = _RecordingStore()
        assets = None if weights_only else saving_lib.DiskIOStore(
            saving_lib._ASSETS_DIRNAME, mode="w")
        try:
            config = None if weights_only else saving_lib._serialize_model_as_json(model)
            with _optimizers_without_copies(model):
                saving_lib._save_state(model, weights_store=weights, assets_store=assets,
                                       inner_path="", visited_saveables=set())
        except BaseException:
            if assets is not None:
                assets.close()
            raise
        return cls(weights, assets, config)

    @property
    def nbytes(self) -> int:
        """Bytes of array data the snapshot holds."""
        return self._weights.nbytes()

    def write(self, path: str) -> None:
        """Writes the snapshot to the local file `path` (`.keras`, or `.weights.h5` for a
        weights-only snapshot), then releases it.

        Raises:
            ValueError: when the extension does not fit the snapshot.
            OSError: when the file cannot be written.
        """
        try:
            if self._config is None:
                if not path.endswith(".weights.h5"):
                    raise ValueError(f"a weights-only snapshot writes a .weights.h5 file, "
                                     f"not {path!r}")
                store = saving_lib.H5IOStore(path, mode="w")
                try:
                    self._weights.replay(store)
                finally:
                    store.close()
                return
            if not path.endswith(".keras"):
                raise ValueError(f"a model snapshot writes a .keras file, not {path!r}")
            config_json, metadata_json = self._config
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr(saving_lib._METADATA_FILENAME, metadata_json)
                archive.writestr(saving_lib._CONFIG_FILENAME, config_json)
                store = saving_lib.H5IOStore(saving_lib._VARS_FNAME_H5, archive=archive,
                                             mode="w")
                try:
                    self._weights.replay(store)
                finally:
                    store.close()
                saving_lib._write_to_zip_recursively(archive, self._assets.working_dir,
                                                     saving_lib._ASSETS_DIRNAME)
        finally:
            self.discard()

    def discard(self) -> None:
        """Releases the recorded state and the assets' temp directory."""
        self._weights.close()
        if self._assets is not None:
            shutil.rmtree(self._assets.tmp_dir, ignore_errors=True)
