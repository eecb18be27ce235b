"""Worker functions exercising ModelCheckpoint, EarlyStopping and SyncStop on real clusters."""

from __future__ import annotations

import time

import numpy as np

from tests.support.cases import case_results, run_cases
from tests.support.models import dense_model
from tests.support.weights import weights_by_path


def _model_and_data(seed: int = 0, steps_per_execution: int = 1):
    import keras
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(192, 6)).astype("float32")
    y = (x[:, 0] - x[:, 1] > 0).astype("float32")
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"), keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", metrics=["accuracy"],
                      steps_per_execution=steps_per_execution)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(32)
    return model, train, val


def checkpoint_job(
    filepath: str,
    epochs: int = 3,
    save_best_only: bool = False,
    max_to_keep: int | None = None,
    stop_rank: int | None = None,
    stop_epoch: int | None = None,
    early_stopping_patience: int | None = None,
    save_freq: str | int = "epoch",
    async_commit: bool = False,
    sabotage: bool = False,
) -> dict:
    """fit with ModelCheckpoint (+ optional one-worker stop and EarlyStopping) and SyncStop.

    `sabotage`: after the chief's probe, its `memory://` checkpoint directory is replaced
    by a file at the first epoch end (before the checkpoint's), so every later write there
    fails; `epochs_ended` counts the epoch ends reached before the error."""
    import fsspec
    import keras

    from disttrain import callbacks, coordination
    from disttrain.errors import DisttrainError

    model, train, val = _model_and_data()
    rank = coordination.get().rank

    class StopOnOneWorker(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if rank == stop_rank and epoch == stop_epoch:
                self.model.stop_training = True

    ended = []

    class Sabotage(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ended.append(epoch)
            if sabotage and rank == 0 and epoch == 0:
                fs, directory = fsspec.core.url_to_fs(checkpoint.directory)
                fs.rm(directory, recursive=True)
                fs.pipe(directory, b"not a directory")

    stack = [StopOnOneWorker(), Sabotage()]
    if early_stopping_patience is not None:
        stack.append(callbacks.EarlyStopping(patience=early_stopping_patience, min_delta=10.0))
    checkpoint = callbacks.ModelCheckpoint(
        filepath, save_best_only=save_best_only, max_to_keep=max_to_keep, save_freq=save_freq,
        async_commit=async_commit,
    )
    stack += [checkpoint, callbacks.SyncStop()]
    started = time.monotonic()
    try:
        history = model.fit(train, validation_data=val, epochs=epochs, callbacks=stack, verbose=0)
    except DisttrainError as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started,
                "epochs_ended": len(ended)}
    return {
        "error": None,
        "epochs_run": len(history.history["loss"]),
        "history": history.history,
        "weights": weights_by_path(model),
        "checkpoints": checkpoint.checkpoints,
        "best": checkpoint.best_checkpoint(),
        "manifest_url": checkpoint.manifest_url,
        "run_id": checkpoint.run_id,
    }


def resume_job(result_dir: str, backup_dir: str, epochs: int = 5,
               crash_epoch: int | None = None, crash_rank: int = 1,
               sigterm_step: int | None = None, steps_per_execution: int = 1,
               csv_path: str | None = None) -> dict:
    """fit with BackupAndRestore + EarlyStopping (+ CSVLogger to `csv_path`); on attempt 0
    `crash_rank` dies after `crash_epoch`, or gets SIGTERM after its training call number
    `sigterm_step` (a call runs `steps_per_execution` steps) and waits until every worker
    has acknowledged it, so that the agreed stop is the next call.

    Writes `<result_dir>/<rank>-<attempt>.json` (the launcher runs this, not the harness).
    """
    import json
    import os
    import signal

    import keras

    from disttrain import callbacks, coordination

    attempt = int(os.environ.get("DISTTRAIN_ATTEMPT", "0"))
    model, train, val = _model_and_data(steps_per_execution=steps_per_execution)
    model.build((None, 6))
    rank = coordination.get().rank

    class CrashOnce(keras.callbacks.Callback):
        steps = 0

        def on_epoch_end(self, epoch, logs=None):
            if attempt == 0 and rank == crash_rank and epoch == crash_epoch:
                os._exit(3)

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if attempt == 0 and rank == crash_rank and self.steps == sigterm_step:
                os.kill(os.getpid(), signal.SIGTERM)
                coordination.get().collect("preemption/ack")

    stopper = callbacks.EarlyStopping(monitor="val_loss", patience=100)
    stack = [callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False), stopper,
             CrashOnce(), callbacks.SyncStop()]
    if csv_path is not None:
        stack.append(callbacks.CSVLogger(csv_path, append=True))
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=stack)
    result = {"attempt": attempt, "epochs_run": len(history.history.get("loss", [])),
              "weights": weights_by_path(model), "best_epoch": stopper.best_epoch}
    with open(os.path.join(result_dir, f"{rank}-{attempt}.json"), "w") as f:
        json.dump(result, f)
    return result


def save_forever(directory: str, name: str, epochs: int = 400,
                 async_commit: bool = False) -> dict:
    """Drives ModelCheckpoint(directory/name, max_to_keep=1, async_commit=...) through many
    epoch ends (with async_commit training one step before each); prints READY first.

    The test SIGKILLs this process at random moments and runs it again (same run id).
    """
    import sys

    from disttrain import callbacks

    model = dense_model(2)
    model.compile("sgd", "mse")
    checkpoint = callbacks.ModelCheckpoint(f"{directory}/{name}", max_to_keep=1,
                                           async_commit=async_commit)
    checkpoint.set_model(model)
    x = np.ones((2, 2), "float32")
    checkpoint.on_train_begin()
    print("READY", flush=True)
    sys.stdout.flush()
    for epoch in range(epochs):
        if async_commit:  # the snapshot then differs from the live state it is written after
            model.train_on_batch(x, x[:, :1])
        checkpoint.on_epoch_end(epoch % 7, {"val_loss": 1.0 / (epoch + 1), "loss": 1.0})
    checkpoint.on_train_end()
    return {"kept": [c["path"] for c in checkpoint.checkpoints]}


def backup_forever(directory: str, epochs: int = 300, async_commit: bool = False) -> dict:
    """fit() with BackupAndRestore backing up at every epoch; prints READY once the first
    backup is committed (with `async_commit`, when the second one starts).

    The test SIGKILLs this process at random moments and runs it again (same run id);
    every run resumes from the latest committed backup.
    """
    import sys

    import keras

    from disttrain import callbacks

    class Ready(keras.callbacks.Callback):
        """Prints READY <first epoch of this run> once this run has committed a backup."""

        def on_epoch_begin(self, epoch, logs=None):
            first = self.model._initial_epoch or 0
            if epoch == first + 1 + async_commit:
                print(f"READY {first}", flush=True)
                sys.stdout.flush()

    model = dense_model(4, [64], seed=0)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x = np.ones((32, 4), "float32")
    history = model.fit(x, x[:, :1], batch_size=16, epochs=epochs, verbose=0, callbacks=[
        callbacks.BackupAndRestore(directory, delete_checkpoint=False,
                                   async_commit=async_commit), Ready()])
    return {"epochs_run": len(history.history.get("loss", []))}


def results_without_errors(run, case: str | None = None) -> list:
    """Test side: the workers' results of a finished `run_cluster` of `checkpoint_job` (or
    of its `case` in `two_worker_cases`), after checking every worker exited 0 (finished
    the case) and reported no error."""
    results = run.assert_ok().results if case is None else case_results(run, case)
    errors = [r["error"] for r in results]
    assert errors == [None] * len(errors), run.report()
    return results


READ_ONLY = "read-only"
"""The folder of `two_worker_cases`'s directory that non-chief workers see read-only."""


def two_worker_cases(directory: str) -> dict:
    """The 2-worker cases of tests/callbacks/test_model_checkpoint.py, each with a new
    model in its own folder of `directory` (made by the test, with `READ_ONLY` and
    `chief-write-failure/m-2.keras`), in one cluster (tests/support/cases.py). The cases
    whose commit fails on purpose come last."""
    import os

    def job(**kwargs):
        return lambda: checkpoint_job(**kwargs)

    def path(*parts: str) -> str:
        return os.path.join(directory, *parts)

    return run_cases({
        "stop_on_one_worker": job(filepath=path("stop", "m.keras"), epochs=10, stop_rank=1,
                                  stop_epoch=1),
        "async_commit": job(filepath=path(READ_ONLY, "m-{epoch}.keras"), epochs=3,
                            max_to_keep=2, async_commit=True),
        "mid_epoch": job(filepath=path("mid-epoch", "m-{epoch}-{batch}.keras"), epochs=1,
                         save_freq=6),
        **{f"failed_commit_{mode}": job(
            filepath=f"memory://failing-commit-{mode}/m-{{epoch}}.keras", epochs=4,
            async_commit=mode == "async", sabotage=True) for mode in ("sync", "async")},
        "chief_write_failure": job(filepath=path("chief-write-failure", "m-{epoch}.keras"),
                                   epochs=5),
        "serializer_failure": lambda: serializer_failure_job(path("serializer")),
    })


def serializer_failure_job(directory: str) -> dict:
    """Two fits per callback, `ModelCheckpoint(async_commit=True)` and
    `BackupAndRestore(async_commit=True)` (backing up every epoch, kept at the end), whose
    model cannot be serialized from its second save on (a layer stores an object array h5py
    cannot write), so the background write fails: in the first fit at its second save (raised
    by the next save), in the second at its last save (raised at the end of fit). Per
    callback and fit: the error (None if none), the epoch ends reached and the files (the
    committed backups) on disk."""
    import os

    import keras

    from disttrain import callbacks, storage
    from disttrain.errors import DisttrainError

    class Unsavable(keras.layers.Dense):
        poisoned = False

        def save_own_variables(self, store):
            super().save_own_variables(store)
            if self.poisoned:
                store["unsavable"] = np.array([object()], dtype=object)

    model, train, _ = _model_and_data()
    with model.distribute_strategy.scope():
        layer = Unsavable(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), layer])
        model.compile("adam", "mse")
    kinds = {
        "ModelCheckpoint": lambda target: callbacks.ModelCheckpoint(
            os.path.join(target, "m-{epoch}.keras"), async_commit=True),
        "BackupAndRestore": lambda target: callbacks.BackupAndRestore(
            target, delete_checkpoint=False, async_commit=True),
    }
    outcomes: dict[str, list] = {}
    for kind, make in kinds.items():
        outcomes[kind] = []
        for fit, epochs in enumerate((3, 2)):
            ended = []

            class Poison(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    ended.append(epoch)
                    layer.poisoned = epoch >= 1

            layer.poisoned = False
            target = os.path.join(directory, kind, str(fit))
            try:
                model.fit(train, epochs=epochs, callbacks=[Poison(), make(target)], verbose=0)
                error = None
            except DisttrainError as e:
                error = f"{type(e).__name__}: {e}"
            files = sorted(os.listdir(target)) if os.path.isdir(target) else []
            if kind == "BackupAndRestore":
                files = [n for n in files if storage.is_committed(os.path.join(target, n))]
            outcomes[kind].append({"error": error, "epochs_ended": len(ended), "files": files})
    return outcomes


def async_backup_job(directory: str) -> dict:
    """One fit of 4 epochs with two BackupAndRestore callbacks backing up every 3 batches and
    keeping every backup, one synchronous and one with `async_commit=True`. The chief
    returns, per backup, whether both directories hold the same weights and manifest
    position; every worker returns the steps its manager recorded."""
    import os

    import h5py

    from disttrain import callbacks, storage

    model, train, _ = _model_and_data()
    sides = {mode: callbacks.BackupAndRestore(
        os.path.join(directory, mode), save_freq=3, delete_checkpoint=False,
        retention=storage.Retention(every_steps=1), async_commit=mode == "async")
        for mode in ("sync", "async")}
    model.fit(train, epochs=4, callbacks=list(sides.values()), verbose=0)
    result = {"records": {mode: [c["step"] for c in side._manager.checkpoints]
                          for mode, side in sides.items()}}
    if not sides["sync"].is_chief:
        return result

    def arrays(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: found.__setitem__(name, item[()])
                         if isinstance(item, h5py.Dataset) else None)
        return found

    same = {}
    for name in sorted(os.listdir(os.path.join(directory, "sync"))):
        urls = {mode: os.path.join(directory, mode, name) for mode in sides}
        weights = {mode: arrays(os.path.join(url, "model.weights.h5"))
                   for mode, url in urls.items()}
        positions = {mode: {k: storage.read_manifest(url)["metadata"][k]
                            for k in ("epoch", "batches", "iterations")}
                     for mode, url in urls.items()}
        same[name] = (weights["sync"].keys() == weights["async"].keys() and all(
            np.array_equal(weights["sync"][k], weights["async"][k]) for k in weights["sync"])
            and positions["sync"] == positions["async"])
    return {**result, "same": same}
