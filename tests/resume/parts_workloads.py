"""Worker functions for per-worker backup parts: an input shaped by NumPy's global random state.

The input reshuffles every epoch (`shuffle(64, seed=1)`) and a `tf.numpy_function` map adds
noise drawn from `np.random` (the global generator, seeded after the model is built, the
same on every worker: with DATA sharding each worker runs the whole pipeline, and the input
check requires them to agree). A restarted process seeded otherwise continues the uninterrupted run's stream only
if BackupAndRestore restores each worker's random state from its part of the backup.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tests.support.models import dense_model

SAMPLES = 96
GLOBAL_BATCH = 12
EPOCHS = 2
FIRST_SEED = 100   # the uninterrupted and the interrupted run: np.random.seed(FIRST_SEED)
RESTART_SEED = 900  # a restarted run seeds np.random otherwise
# Worker 1 gets SIGTERM after this (epoch, batch); the backup is taken after the next batch.
SIGTERM_AT = (1, 2)
REFUSALS = ("deleted", "edited", "corrupted")
# The input check stays on: it draws the first element from an iterator of its own before
# `fit`, whose prefetching draws a varying number of elements ahead, and puts the random
# states back afterwards (`InputStream.kept`), so two runs seeded alike start alike.
ENV: dict[str, str] = {}


def _fresh(seed: int):
    """A new model and pipeline, then `np.random.seed(seed)`, once the previous run's input
    iterators are gone: a persistent iterator prefetches on after `fit` returns, and its
    draws would land in this run's stream (a restarted process has no such neighbour)."""
    import keras
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy
    from disttrain.resume import input_state

    strategy = make_strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = (x[:, :1] - x[:, 1:2] > 0).astype("float32")
    with strategy.scope():
        model = dense_model(6, [8], activation="relu", output_activation="sigmoid", seed=3)
        model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.build((None, 6))

    def noise(a):
        return (a + 0.1 * np.random.normal(size=a.shape)).astype("float32")

    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=1)
             .map(lambda a, b: (tf.ensure_shape(tf.numpy_function(noise, [a], tf.float32), (6,)),
                                b))
             .batch(GLOBAL_BATCH))
    input_state.settle()
    np.random.seed(seed)
    return model, train


def _fit(seed: int, backup_dir: str | None = None, sigterm: bool = False,
         random_state: bool = True, kill_chief_at: int | None = None) -> dict:
    """Trains a fresh model; returns its weights, or how it was interrupted (the error's
    type and message). `sigterm`: worker 1 gets SIGTERM after `SIGTERM_AT`.
    `kill_chief_at`: the chief SIGKILLs itself once every worker's part of its
    `kill_chief_at`-th backup is written, before the chief commits it."""
    import hashlib
    import signal

    import keras

    from disttrain import callbacks, coordination, resume
    from disttrain.callbacks import backup_and_restore
    from disttrain.errors import DisttrainError, Preempted

    model, train = _fresh(seed)
    rank = coordination.get().rank

    class Sigterm(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if sigterm and (self.epoch, batch) == SIGTERM_AT and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                coordination.get().collect("preemption/ack")

    if kill_chief_at is not None:
        write_parts = backup_and_restore.BackupAndRestore._write_parts
        saved = []

        def crash_after_parts(self, metadata):
            written = write_parts(self, metadata)
            saved.append(written)
            if len(saved) == kill_chief_at and self.is_chief:
                os.kill(os.getpid(), signal.SIGKILL)
            return written

        backup_and_restore.BackupAndRestore._write_parts = crash_after_parts
    stack = [Sigterm()]
    if backup_dir is not None:
        stack.insert(0, callbacks.BackupAndRestore(backup_dir, save_freq=2,
                                                   delete_checkpoint=False, verbose=1,
                                                   random_state=random_state))
    try:
        model.fit(train, epochs=EPOCHS, verbose=0, callbacks=stack)
    except (DisttrainError, Preempted) as e:
        return {"interrupted": type(e).__name__, "message": str(e)}
    start = resume.current().stream.stream_start()
    return {"interrupted": None,
            "weights": [np.asarray(v.numpy()).tolist() for v in model.weights],
            "stream_start": None if start is None else hashlib.sha256(
                json.dumps(start, sort_keys=True).encode()).hexdigest()}


def _snapshot(directory: str) -> dict:
    """Every file under `directory`: its bytes (hex) and mtime."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = [f.read().hex(),
                                                           os.stat(path).st_mtime_ns]
    return files


def _damage(directory: str, how: str) -> None:
    """Damages worker 1's part of the one backup in `directory`: deleted, edited to another
    step (its manifest entry updated to match, as a buggy writer would leave it), or one
    byte changed (same size)."""
    from disttrain import storage

    [name] = os.listdir(directory)
    part = os.path.join(directory, name, "worker-1.json")
    if how == "deleted":
        os.remove(part)
    elif how == "edited":
        record = json.load(open(part))
        record["batches"] += 2
        data = json.dumps(record, sort_keys=True).encode()
        open(part, "wb").write(data)
        manifest_path = os.path.join(directory, name, storage.MANIFEST_NAME)
        manifest = json.load(open(manifest_path))
        manifest["files"]["worker-1.json"] = storage.describe_bytes(data)
        open(manifest_path, "w").write(json.dumps(manifest))
    else:
        data = bytearray(open(part, "rb").read())
        data[data.index(b'"rank"') + 1] ^= 0x20
        open(part, "wb").write(bytes(data))


def parts_runs(root: str) -> dict:
    """On one cluster: an uninterrupted run; a run preempted mid-epoch (backups every 2
    batches) whose backup is copied; that backup resumed with another seed, with and without
    the parts; a refused resume of each damaged copy (files before and after); last a run
    whose chief is SIGKILLed after its 3rd backup's parts are written. The results before
    the kill are written to `<root>/results-<rank>.json`."""
    from disttrain import coordination

    rank = coordination.get().rank
    backup = os.path.join(root, "preempted")
    results = {"reference": _fit(FIRST_SEED, os.path.join(root, "reference")),
               "preempted": _fit(FIRST_SEED, backup, sigterm=True)}
    copies = {name: os.path.join(root, name) for name in ("no-parts", *REFUSALS)}
    if rank == 0:
        for how, copy in copies.items():
            shutil.copytree(backup, copy)
            if how in REFUSALS:
                _damage(copy, how)
    coordination.get().barrier("parts_workloads.copies")
    results["resumed"] = _fit(RESTART_SEED, backup)
    results["no-parts"] = _fit(RESTART_SEED, copies["no-parts"], random_state=False)
    for how in REFUSALS:
        before = _snapshot(copies[how])
        results[how] = {**_fit(RESTART_SEED, copies[how]), "unchanged":
                        _snapshot(copies[how]) == before}
    with open(os.path.join(root, f"results-{rank}.json"), "w") as f:
        json.dump(results, f)
    coordination.get().barrier("parts_workloads.results")
    return _fit(FIRST_SEED, os.path.join(root, "killed"), kill_chief_at=3)


def resume_killed(backup_dir: str) -> dict:
    """Resumes the run whose chief was killed; returns its weights and what it printed."""
    return _fit(FIRST_SEED, backup_dir)
