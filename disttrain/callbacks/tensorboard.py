"""TensorBoard that writes to `log_dir` from the chief only."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import secrets
import weakref

import keras

from disttrain import storage
from disttrain.callbacks.base import DistributedCallback
from disttrain.errors import CallbackConfigError, StorageError

NON_CHIEF_MODES = ("off", "scratch")


def _when_writing(hook):
    """Keras's `hook`, run only on workers that write TensorBoard logs."""

    @functools.wraps(hook)
    def gated(self, *args, **kwargs):
        if self.write_dir is not None:
            return hook(self, *args, **kwargs)
        return None

    return gated


class TensorBoard(DistributedCallback, keras.callbacks.TensorBoard):
    """Writes TensorBoard logs from the chief; other workers never write to `log_dir`.

    Same arguments and meaning as `keras.callbacks.TensorBoard`, plus
    `non_chief`. The chief writes to `log_dir` exactly as Keras does (TensorFlow
    writes local paths and `gs://` itself). Differences:

    - Non-chief workers never write to `log_dir`. With `non_chief="off"`
      (default) they write nothing at all (no summaries, no profile, no
      embeddings checkpoint); with `non_chief="scratch"` each writes its own
      logs to a private local scratch directory (`storage.scratch_dir`, path in
      `write_dir`), removed at train end, or at process exit when `fit` raised.
    - At `set_model` the chief creates `log_dir` and probes it with a small file;
      if it cannot write there (permissions, a read-only file system, a URL
      scheme TensorFlow cannot write such as `memory://`), every worker raises
      the same `StorageError` before training.
    - `write_dir` is where this worker writes: `log_dir` on the chief, the
      scratch directory or `None` elsewhere.

    Args:
        log_dir: directory of the log files, a local path or `gs://` URL; do not
            share it with other callbacks.
        histogram_freq: epochs between weight histograms (0: none); needs
            validation data.
        write_graph: whether to write the model graph.
        write_images: whether to write model weights as images.
        write_steps_per_second: whether to log training steps per second.
        update_freq: `"epoch"`, `"batch"` or an integer number of batches
            between metric summaries.
        profile_batch: batch (or `(start, stop)` range of batches) to profile;
            0 disables profiling.
        embeddings_freq: epochs between embedding visualizations (0: none).
        embeddings_metadata: embedding layer name to metadata file name, or one
            file name for all embedding layers.
        non_chief: `"off"` (non-chief workers write nothing) or `"scratch"`
            (each writes to its own scratch directory, removed at train end).

    Example:

    ```python
    tensorboard = disttrain.callbacks.TensorBoard("gs://bucket/run/tensorboard")
    model.fit(train, epochs=10, callbacks=[tensorboard])
    ```
    """

    def __init__(
        self,
        log_dir="logs",
        histogram_freq=0,
        write_graph=True,
        write_images=False,
        write_steps_per_second=False,
        update_freq="epoch",
        profile_batch=0,
        embeddings_freq=0,
        embeddings_metadata=None,
        non_chief: str = "off",
    ):
        if importlib.util.find_spec("tensorboard") is None:
            raise CallbackConfigError(
                "TensorBoard needs the 'tensorboard' package, which TensorFlow no longer "
                "installs. Fix: pip install tensorboard (or disttrain[demo]), or leave "
                "TensorBoard out (recommended(..., tensorboard=False))."
            )
        if non_chief not in NON_CHIEF_MODES:
            raise CallbackConfigError(
                f"TensorBoard(non_chief={non_chief!r}): not a known mode. Fix: pass "
                "'off' (non-chief workers write nothing) or 'scratch' (each writes to "
                "its own local scratch directory, removed at train end)."
            )
        super().__init__(
            log_dir=log_dir, histogram_freq=histogram_freq, write_graph=write_graph,
            write_images=write_images, write_steps_per_second=write_steps_per_second,
            update_freq=update_freq, profile_batch=profile_batch,
            embeddings_freq=embeddings_freq, embeddings_metadata=embeddings_metadata,
        )
        self.non_chief = non_chief
        self.write_dir: str | None = None
        self._scratch_cleanup: weakref.finalize | None = None

    def set_model(self, model):
        self._remove_scratch()
        run_id = self.run_id if self.non_chief == "scratch" else None
        self.coordinator.run_on_chief("TensorBoard.log_dir", self._make_log_dir, StorageError)
        if self.is_chief:
            self.write_dir = self.log_dir
        elif run_id is not None:
            self.write_dir = self._make_scratch(run_id)
        else:
            self.write_dir = None
            keras.callbacks.Callback.set_model(self, model)
            return
        log_dir = self.log_dir
        self.log_dir = self.write_dir
        try:
            super().set_model(model)
        finally:
            self.log_dir = log_dir

    on_train_begin = _when_writing(keras.callbacks.TensorBoard.on_train_begin)
    on_train_batch_begin = _when_writing(keras.callbacks.TensorBoard.on_train_batch_begin)
    on_train_batch_end = _when_writing(keras.callbacks.TensorBoard.on_train_batch_end)
    on_epoch_begin = _when_writing(keras.callbacks.TensorBoard.on_epoch_begin)
    on_epoch_end = _when_writing(keras.callbacks.TensorBoard.on_epoch_end)
    on_test_begin = _when_writing(keras.callbacks.TensorBoard.on_test_begin)
    on_test_batch_begin = _when_writing(keras.callbacks.TensorBoard.on_test_batch_begin)
    on_test_end = _when_writing(keras.callbacks.TensorBoard.on_test_end)

    def on_train_end(self, logs=None):
        try:
            if self.write_dir is not None:
                super().on_train_end(logs)
        finally:
            self._remove_scratch()

    def _make_log_dir(self) -> None:
        """Chief only: creates `log_dir` and writes and removes a probe file in it.

        TensorFlow's summary writer fails at train begin on a directory it cannot
        write (an existing read-only one passes `makedirs`), with a TensorFlow
        error on the chief alone; the probe makes that the same `StorageError`
        on every worker.
        """
        import tensorflow as tf

        probe = f"{str(self.log_dir).rstrip('/')}/{storage.PROBE_PREFIX}{secrets.token_hex(8)}"
        try:
            tf.io.gfile.makedirs(self.log_dir)
            with tf.io.gfile.GFile(probe, "w") as f:
                f.write("disttrain write probe\n")
            tf.io.gfile.remove(probe)
        except tf.errors.OpError as e:
            raise StorageError(
                f"TensorBoard cannot write to log_dir {self.log_dir!r}: {e.message}. Fix: "
                "check the permissions of log_dir; TensorBoard writes through TensorFlow's "
                "file systems, so use a writable local path or a gs:// URL."
            ) from e

    def _make_scratch(self, run_id: str) -> str:
        stack = contextlib.ExitStack()
        label = f"{self.coordinator.cluster.label}-tensorboard"
        path = stack.enter_context(storage.scratch(run_id, label))
        self._scratch_cleanup = weakref.finalize(self, stack.close)
        return path

    def _remove_scratch(self) -> None:
        if self._scratch_cleanup is not None:
            self._scratch_cleanup()
            self._scratch_cleanup = None
