"""Worker functions for the multi-worker tests of ReduceLROnPlateau, CSVLogger, TensorBoard
and TerminateOnNaN (tests/test_<callback>.py), run by the `callbacks_cluster` fixture of
tests/callbacks/conftest.py.

`misc_callbacks` runs every scenario, one after the other, in one cluster (a
cluster start costs more than the scenarios): ReduceLROnPlateau, CSVLogger,
TensorBoard (off and scratch), TerminateOnNaN and, last, the cases of
`callback_loop_workloads` (custom loops, several checkpoints, on_chief, multi-metric
EarlyStopping; tests/callbacks/test_callbacks_beyond_fit.py). Each returns a JSON summary
the test compares across workers.

To prove that non-chief workers write nothing to a destination, a non-chief
worker started as root runs the CSVLogger and TensorBoard(non_chief="off")
scenarios with the effective user and group `nobody` and no supplementary
groups: it cannot write (or even reach) the destination directories, so any
write it attempted would fail the scenario.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

from tests.callbacks import callback_loop_workloads
from tests.support.models import dense_model
from tests.support.weights import trainable_weight_lists

GLOBAL_BATCH = 16
NOBODY = 65534


def _model(learning_rate: float = 0.05):
    import keras

    from disttrain.distribute import strategy as make_strategy

    with make_strategy().scope():
        model = dense_model(4, [8], activation="relu", seed=1)
        model.compile(keras.optimizers.SGD(learning_rate), "mse")
    return model


def _arrays(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _datasets(n: int = 128, nan_at: int | None = None):
    import tensorflow as tf

    x, y = _arrays(n)
    if nan_at is not None:
        y[nan_at] = np.nan
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    val = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(GLOBAL_BATCH)
    return train, val


def _rank() -> int:
    from disttrain import coordination

    return coordination.get().rank


@contextlib.contextmanager
def _unprivileged_unless_chief():
    """Runs the block as `nobody` on a non-chief worker started as root."""
    from disttrain import coordination

    drop = os.geteuid() == 0 and not coordination.get().is_chief
    groups = os.getgroups()
    if drop:
        os.setgroups([])
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    try:
        yield drop
    finally:
        if drop:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(groups)


def reduce_lr() -> dict:
    """Worker 1 alone sees a steadily improving val_loss; the chief's LR must win."""
    import keras

    from disttrain.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau

    model = _model(0.1)
    rank = _rank()
    rates = []

    def perturb(epoch, logs):
        if rank == 1:
            logs["val_loss"] -= 1000.0 * (epoch + 1)

    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_end=perturb),
        ReduceLROnPlateau(monitor="val_loss", patience=1, min_delta=100, factor=0.1),
    ]

    def record(*_):
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))

    # The rate each worker trains the next epoch with: set after the epoch end's exchange.
    callbacks.append(keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch and record(), on_train_end=record))
    train, val = _datasets()
    model.fit(train, validation_data=val, epochs=3, callbacks=callbacks, verbose=0)
    return {"rates": rates, "weights": trainable_weight_lists(model)}


def csv_logger(workdir: str) -> dict:
    """Two appending fits to `<workdir>/csv/log.csv`, then a fit whose chief write fails."""
    from disttrain.callbacks.csv_logger import CSVLogger
    from disttrain.errors import StorageError

    url = os.path.join(workdir, "csv", "log.csv")
    train, val = _datasets()
    with _unprivileged_unless_chief() as unprivileged:
        denied = None
        if unprivileged:
            try:
                open(os.path.join(workdir, "csv", "control"), "w").close()
            except PermissionError as e:
                denied = type(e).__name__
        for epochs in (2, 1):
            model = _model()
            model.fit(train, validation_data=val, epochs=epochs, verbose=0,
                      callbacks=[CSVLogger(url, append=True)])
        failure = None
        try:
            _model().fit(train, epochs=2, verbose=0,
                         callbacks=[CSVLogger(os.path.join(workdir, "blocker", "log.csv"))])
        except StorageError as e:
            failure = f"{type(e).__name__}: {e}"
    return {"unprivileged": unprivileged, "control_write": denied, "failure": failure}


def tensorboard_off(workdir: str) -> dict:
    from disttrain.callbacks.tensorboard import TensorBoard

    train, val = _datasets()
    callback = TensorBoard(os.path.join(workdir, "tb_off"), histogram_freq=1)
    with _unprivileged_unless_chief() as unprivileged:
        _model().fit(train, validation_data=val, epochs=2, verbose=0, callbacks=[callback])
    return {"unprivileged": unprivileged, "write_dir": callback.write_dir}


def tensorboard_scratch(workdir: str) -> dict:
    import keras

    from disttrain.callbacks.tensorboard import TensorBoard

    train, val = _datasets()
    callback = TensorBoard(os.path.join(workdir, "tb_scratch"), non_chief="scratch")
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.extend(
            name for _, _, names in os.walk(callback.write_dir) for name in names
        )
    )
    _model().fit(train, validation_data=val, epochs=1, verbose=0, callbacks=[callback, probe])
    return {
        "write_dir": callback.write_dir,
        "files_during_fit": sorted(seen),
        "exists_after_fit": os.path.exists(callback.write_dir),
    }


def tensorboard_scratch_fit_raises(workdir: str) -> dict:
    """A fit that raises skips on_train_end; the scratch directory must go at exit."""
    import keras

    from disttrain.callbacks.tensorboard import TensorBoard

    def fail(epoch, logs):
        raise RuntimeError("planned failure")

    train, _ = _datasets()
    callback = TensorBoard(os.path.join(workdir, "tb_scratch"), non_chief="scratch")
    try:
        _model().fit(train, epochs=2, verbose=0,
                     callbacks=[callback, keras.callbacks.LambdaCallback(on_epoch_end=fail)])
    except RuntimeError as e:
        error = str(e)
    return {"write_dir": callback.write_dir, "error": error,
            "exists_after_error": os.path.exists(callback.write_dir)}


def _per_worker_dataset(nan_on_worker: int, nan_batch: int):
    """Each worker's own pipeline (`distribute_datasets_from_function`); only the
    input of worker `nan_on_worker` holds a NaN label, in its batch `nan_batch`."""
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()

    def dataset(context):
        x, y = (a[: 128 // context.num_input_pipelines] for a in _arrays())
        if context.input_pipeline_id == nan_on_worker:
            y = y.copy()
            y[nan_batch * context.get_per_replica_batch_size(GLOBAL_BATCH)] = np.nan
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(
            context.get_per_replica_batch_size(GLOBAL_BATCH))

    return strategy.distribute_datasets_from_function(dataset)


def _fit_with_nan_check(raise_error: bool, nan_on_worker: int | None,
                        nan_at: int | None) -> dict:
    """Fits 2 epochs with TerminateOnNaN; `nan_on_worker` alone reads a NaN label at
    batch 3 (each worker its own input), `nan_at` puts one in the shared input."""
    import keras

    from disttrain import coordination
    from disttrain.callbacks.terminate_on_nan import TerminateOnNaN

    batches = []
    callbacks = [
        TerminateOnNaN(raise_error=raise_error),
        keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b)),
    ]
    train = (_datasets(nan_at=nan_at)[0] if nan_on_worker is None
             else _per_worker_dataset(nan_on_worker, nan_batch=3))
    model = _model()
    error = None
    started = time.monotonic()
    exchanges = coordination.get()._seq
    try:
        history = model.fit(train, epochs=2, verbose=0, callbacks=callbacks).history
    except RuntimeError as e:
        error, history = f"{type(e).__name__}: {e}", {}
    return {
        "batches": batches,
        "epochs": len(history.get("loss", [])),
        "last_loss_finite": bool(history) and math.isfinite(history["loss"][-1]),
        "error": error,
        "stop_training": bool(model.stop_training),
        "exchanges": coordination.get()._seq - exchanges,
        "seconds": time.monotonic() - started,
    }


def terminate_on_nan() -> dict:
    return {
        "nan_in_data": _fit_with_nan_check(False, None, nan_at=40),
        "nan_on_worker_1_only": _fit_with_nan_check(False, 1, None),
        "nan_on_worker_1_only_raise": _fit_with_nan_check(True, 1, None),
        "no_nan": _fit_with_nan_check(False, None, None),
    }


def misc_callbacks(workdir: str) -> dict:
    timings = {}
    results = {"pid": os.getpid(), "rank": _rank()}
    for name, scenario in (
        ("reduce_lr", reduce_lr),
        ("csv_logger", lambda: csv_logger(workdir)),
        ("tensorboard_off", lambda: tensorboard_off(workdir)),
        ("tensorboard_scratch", lambda: tensorboard_scratch(workdir)),
        ("tensorboard_scratch_fit_raises", lambda: tensorboard_scratch_fit_raises(workdir)),
        ("terminate_on_nan", terminate_on_nan),
        # Last: its chief-only collective cases end fits with errors on purpose.
        ("beyond_fit", lambda: callback_loop_workloads.beyond_fit_job(
            os.path.join(workdir, "beyond_fit"), list(callback_loop_workloads.CASES))),
    ):
        started = time.monotonic()
        results[name] = scenario()
        timings[name] = round(time.monotonic() - started, 2)
    results["timings"] = timings
    return results
