"""Checkpoints: the chief's commit vs a plain `model.save`, and what non-chief workers write.

disttrain's `ModelCheckpoint` commits on the chief (temp file in the destination
directory, fsync, rename, fsync of the directory, then the `best.json` manifest)
after agreeing with the other workers; with `async_commit=True` everything after
the temp file is written runs in a background thread, and the row times what the
training thread waits for. The peer is the chief calling `model.save` to a
sibling directory on the same file system. A further side shows what durability
alone costs: the chief's `model.save` through `storage.atomic_local_file` (temp
file, fsync, rename, fsync of the directory), without manifest, marker or
exchange. The sides rotate save by save. Bytes are counted with `/proc/self/io`
(wchar) on each worker around its checkpoint callback; tf_keras's
`ModelCheckpoint` on a non-chief worker saves a full copy into
`workertemp_<id>/` and deletes it. Last, one `BackupAndRestore` save (integer
`save_freq`, timed on the chief around the batch end that backs up) with each
worker's part (`random_state=True`, the default: one more small file per worker
and one more exchange) against the same save without parts, alternating.

Snapshot, then write (one process, `snapshot_worker`): per model size, the time
the training thread is blocked per save and the time until the checkpoint is
committed (readable), rotating save by save: a plain `model.save`; TensorFlow's
asynchronous `tf.train.Checkpoint(model=..., optimizer=...).write` with
`CheckpointOptions(enable_async=True)` (a new `Checkpoint` per save: with Keras 3
a second async write of the same one fails, "tf.function only supports singleton
tf.Variables"); disttrain's synchronous `ModelCheckpoint`; and
`ModelCheckpoint(async_commit=True)` (snapshot, then write); and a
`BackupAndRestore` backup (`save_freq=1`, timed around the batch end that backs
up), synchronous and with `async_commit=True`. Last, a save asked while the
previous async one is still in flight (it waits for it).

Training with saves (`_fits`, 2 workers): the time per training step of a
real `fit` that saves every epoch (ModelCheckpoint or BackupAndRestore, each
synchronous and async) against the same `fit` saving nothing, the sides
rotating fit by fit; the first epoch of each fit is not timed, the end of `fit`
(which waits for the last commit) is.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
from typing import Any

from benchmarks.cluster import TF_KERAS_ENV, TF_KERAS_MISSING, has_tf_keras, on_cluster
from benchmarks.report import Goal, Row, Stat, ratio_row
from benchmarks.settings import Settings
from benchmarks.timing import bytes_written, median_ms

FEATURES = 1000


def sized_model(keras, params: int):
    """A dense model with about `params` parameters (4 bytes each), compiled."""
    hidden = max(1, params // (2 * FEATURES))
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(hidden),
                              keras.layers.Dense(FEATURES)])
    model.compile("adam", "mse")
    return model


def disttrain_worker(directory: str, params: list[int], rounds: int,
                     fit: dict[str, int]) -> dict[str, Any]:
    """On every worker: per size, `rounds` commits and `rounds` plain saves, alternating;
    the backups with and without parts; then the fits with and without saves (`fit`:
    `_fits`'s arguments)."""
    import keras

    import disttrain
    from disttrain import callbacks, coordination, storage

    strategy = disttrain.strategy()
    coord = coordination.get()
    result: dict[str, Any] = {"chief": coord.is_chief}
    for size in params:
        with strategy.scope():
            model = sized_model(keras, size)
        checkpoints = {}
        for mode in ("sync", "async"):
            checkpoints[mode] = callbacks.ModelCheckpoint(
                os.path.join(directory, str(size), mode, "model.keras"),
                async_commit=mode == "async")
            checkpoints[mode].set_model(model)
            checkpoints[mode].on_train_begin()
        plain = os.path.join(directory, str(size), "plain", "model.keras")
        os.makedirs(os.path.dirname(plain), exist_ok=True)
        durable = os.path.join(directory, str(size), "durable", "model.keras")

        def save_durably(model=model, path=durable):
            with storage.atomic_local_file(path) as tmp:
                model.save(tmp)

        saves = {"plain": functools.partial(model.save, plain), "durable": save_durably}
        result[str(size)] = _alternate(coord, checkpoints, saves, rounds)
        result[str(size)]["file_bytes"] = os.path.getsize(plain) if coord.is_chief else 0
    with strategy.scope():
        model = sized_model(keras, min(params))
    result["backup"] = _backup_parts(coord, model, os.path.join(directory, "backup"), rounds)
    result["fit"] = _fits(strategy, os.path.join(directory, "fit"), **fit)
    return result


def _backup_parts(coord, model, directory: str, rounds: int) -> dict[str, list[float]]:
    """`rounds` BackupAndRestore saves with per-worker parts and as many without,
    alternating; each save is the batch end that backs up (`save_freq=1`)."""
    from disttrain import callbacks

    sides = {}
    for parts in (True, False):
        sides[parts] = callbacks.BackupAndRestore(
            os.path.join(directory, str(parts)), save_freq=1, random_state=parts)
        sides[parts].set_model(model)
        sides[parts].on_train_begin()
    times: dict[bool, list[float]] = {True: [], False: []}
    for batch in range(rounds + 1):  # the first round warms both up, untimed
        for parts in (True, False) if batch % 2 else (False, True):
            coord.barrier("bench.checkpoint.backup")
            took = median_ms(lambda b=batch, p=parts: sides[p].on_train_batch_end(b), 1,
                             warmup=0)
            if batch:
                times[parts].append(took)
    for callback in reversed(sides.values()):  # each puts back the SIGTERM handler it found
        callback.on_train_end()
    return {"parts_ms": times[True], "no_parts_ms": times[False]}


def _alternate(coord, checkpoints: dict, saves: dict, rounds: int) -> dict[str, Any]:
    """Rotates a synchronous commit and an async one (every worker) and the `saves`
    without disttrain's callback (the chief). The async side is timed until
    `on_epoch_end` returns; its background commit is then waited for, untimed, so it
    never overlaps the next measurement."""
    times: dict[str, list[float]] = {side: [] for side in [*checkpoints, *saves]}
    written = []
    order = list(times)
    for epoch in range(rounds):
        shift = epoch % len(order)
        for side in order[shift:] + order[:shift]:
            if side in saves:
                coord.barrier("bench.checkpoint.save")
                if coord.is_chief:
                    times[side].append(median_ms(saves[side], 1, warmup=0))
                continue
            checkpoint = checkpoints[side]
            before = bytes_written()
            times[side].append(median_ms(
                lambda e=epoch: checkpoint.on_epoch_end(e, {"loss": 1.0}), 1, warmup=0))
            checkpoint._manager.wait()
            written.append(bytes_written() - before)
    return {"commit_ms": times["sync"], "async_ms": times["async"], "save_ms": times["plain"],
            "durable_ms": times["durable"], "written": statistics.median(written)}


def snapshot_worker(directory: str, params: list[int], rounds: int) -> dict[str, Any]:
    """One process: blocking and committed times (ms) per side and size; see the module
    docstring."""
    import time

    import keras
    import tensorflow as tf

    from disttrain import callbacks

    result: dict[str, Any] = {}
    for size in params:
        model = sized_model(keras, size)
        model.optimizer.build(model.trainable_variables)
        base = os.path.join(directory, str(size))
        checkpoints = {mode: callbacks.ModelCheckpoint(
            os.path.join(base, mode, "model.keras"), async_commit=mode == "async")
            for mode in ("sync", "async")}
        for checkpoint in checkpoints.values():
            checkpoint.set_model(model)
            checkpoint.on_train_begin()
        plain = os.path.join(base, "plain", "model.keras")
        os.makedirs(os.path.dirname(plain), exist_ok=True)
        tf_prefix = os.path.join(base, "tf", "ckpt")
        options = tf.train.CheckpointOptions(enable_async=True)

        def tf_async(model=model):
            checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
            checkpoint.write(tf_prefix, options=options)
            return checkpoint.sync

        backups = {mode: callbacks.BackupAndRestore(
            os.path.join(base, f"backup-{mode}"), save_freq=1, async_commit=mode == "async")
            for mode in ("sync", "async")}
        for backup in backups.values():
            backup.set_model(model)
            backup.on_train_begin()

        def ours(mode, epoch):
            checkpoints[mode].on_epoch_end(epoch, {"loss": 1.0})
            return checkpoints[mode]._manager.wait

        def backed_up(mode, epoch):
            backups[mode].on_train_batch_end(epoch)
            return backups[mode]._manager.wait

        sides = {"plain": lambda e: model.save(plain), "tf_async": lambda e: tf_async(),
                 "sync": functools.partial(ours, "sync"), "async": functools.partial(ours, "async"),
                 "backup_sync": functools.partial(backed_up, "sync"),
                 "backup_async": functools.partial(backed_up, "async")}
        times: dict[str, dict[str, list[float]]] = {
            side: {"blocked": [], "committed": []} for side in sides}
        order = list(sides)
        for epoch in range(rounds + 1):  # the first round warms every side up, untimed
            shift = epoch % len(order)
            for side in order[shift:] + order[:shift]:
                start = time.perf_counter()
                done = sides[side](epoch)
                blocked = time.perf_counter() - start
                if done is not None:
                    done()
                if epoch:
                    times[side]["blocked"].append(blocked * 1000)
                    times[side]["committed"].append((time.perf_counter() - start) * 1000)
        waits = []
        for epoch in range(rounds):
            ours("async", rounds + 2 * epoch)
            start = time.perf_counter()
            done = ours("async", rounds + 2 * epoch + 1)
            waits.append((time.perf_counter() - start) * 1000)
            done()
        for checkpoint in [*checkpoints.values(), *reversed(backups.values())]:
            checkpoint.on_train_end()
        result[str(size)] = {**times, "back_to_back": waits,
                             "file_bytes": os.path.getsize(plain)}
        del model, checkpoints, backups
    return result


def _fits(strategy, directory: str, params: int, steps: int, epochs: int,
          rounds: int) -> dict[str, list[float]]:
    """On every worker: per side, the seconds per step of each `fit` (see the module
    docstring); `epochs` timed epochs after an untimed one."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from disttrain import callbacks

    with strategy.scope():
        model = sized_model(keras, params)
    batch = 64
    x = np.random.default_rng(0).normal(size=(steps * batch, FEATURES)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x)).batch(batch)

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start

    def side(name: str, fit: int) -> list:
        target = os.path.join(directory, name, str(fit))
        if name.startswith("backup"):
            return [callbacks.BackupAndRestore(target, delete_checkpoint=False,
                                               async_commit=name.endswith("async"))]
        if name == "none":
            return []
        return [callbacks.ModelCheckpoint(os.path.join(target, "m-{epoch}.keras"),
                                          async_commit=name == "async")]

    order = ["none", "sync", "async", "backup_sync", "backup_async"]
    seconds: dict[str, list[float]] = {name: [] for name in order}
    for fit in range(rounds):
        shift = fit % len(order)
        for name in order[shift:] + order[:shift]:
            timer = Timer()
            model.fit(data, epochs=epochs + 1, verbose=0, callbacks=[*side(name, fit), timer])
            seconds[name].append(timer.seconds / (epochs * steps))
    return seconds


def tf_keras_worker(directory: str, params: int) -> dict[str, Any]:
    """On every worker: bytes written by one tf_keras `ModelCheckpoint` save."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = sized_model(tf.keras, params)
    checkpoint = tf.keras.callbacks.ModelCheckpoint(os.path.join(directory, "model.keras"))
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    before = bytes_written()
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    return {"chief": strategy.cluster_resolver.task_id == 0, "written": bytes_written() - before}


def measure(settings: Settings, workers: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as tmp:
        ours = on_cluster(disttrain_worker, workers, {
            "directory": os.path.join(tmp, "disttrain"), "params": list(settings.checkpoint_params),
            "rounds": settings.checkpoint_rounds,
            "fit": {"params": settings.fit_params, "steps": settings.fit_steps,
                    "epochs": settings.epochs, "rounds": settings.rounds}}, timeout=2400)
        snapshots = on_cluster(snapshot_worker, 1, {
            "directory": os.path.join(tmp, "snapshot"), "params": list(settings.snapshot_params),
            "rounds": settings.snapshot_rounds}, timeout=3000)[0]
        theirs = on_cluster(tf_keras_worker, workers, {
            "directory": os.path.join(tmp, "tf_keras"),
            "params": max(settings.checkpoint_params)}, env=TF_KERAS_ENV) if has_tf_keras() else []
    return {"disttrain": ours, "tf_keras": theirs, "snapshot": snapshots}


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:.0f} B"


def rows(measured: dict[str, Any], settings: Settings) -> list[Row]:
    chief = next(r for r in measured["disttrain"] if r["chief"])
    others = [r for r in measured["disttrain"] if not r["chief"]]
    result = []
    for size in settings.checkpoint_params:
        one = chief[str(size)]
        size_text = _megabytes(one["file_bytes"])
        result.append(ratio_row(
            f"checkpoint commit on the chief, {size_text} .keras file",
            one["commit_ms"], "model.save, same file system", one["save_ms"], " ms", Goal(1.05)))
        result.append(ratio_row(
            f"  async_commit=True: training blocked, {size_text}",
            one["async_ms"], "model.save, same file system", one["save_ms"], " ms",
            Goal(0.15) if one["file_bytes"] >= 1e8 else None))
        result.append(ratio_row(
            f"  fsync + atomic rename alone (storage.atomic_local_file), {size_text}",
            one["durable_ms"], "model.save, same file system", one["save_ms"], " ms"))
    largest = str(max(settings.checkpoint_params))
    ours = Stat.of([r[largest]["written"] for r in others])
    theirs = [r["written"] for r in measured["tf_keras"] if not r["chief"]]
    peer = (f"tf_keras ModelCheckpoint: {_megabytes(Stat.of(theirs).median)}" if theirs
            else TF_KERAS_MISSING)
    goal_met = "met" if ours.high == 0 else "MISSED"
    model_size = _megabytes(int(chief[largest]["file_bytes"]))
    result.append(Row(
        f"bytes written per save by each non-chief worker ({model_size} model)",
        _megabytes(ours.median), peer, "-", f"0: {goal_met}"))
    result += _snapshot_rows(measured["snapshot"], settings)
    result += _fit_rows(chief["fit"], settings)
    backup = chief["backup"]
    result.append(ratio_row(
        f"BackupAndRestore save with per-worker parts, {len(measured['disttrain'])} workers",
        backup["parts_ms"], "without parts (random_state=False)", backup["no_parts_ms"], " ms"))
    return result


def _snapshot_rows(measured: dict[str, Any], settings: Settings) -> list[Row]:
    """Blocking and committed times per save of one process, per size (`snapshot_worker`)."""
    rows_ = []
    for size in settings.snapshot_params:
        one = measured[str(size)]
        size_text = (f"{_megabytes(size * 4)} of weights, "
                     f"{_megabytes(one['file_bytes'])} .keras")
        plain = one["plain"]["blocked"]
        rows_.append(Row(f"one process, {size_text}: model.save blocks",
                         Stat.of(plain).show(" ms", 1), "-"))
        goal = Goal(0.15) if size * 4 >= 1e8 else None
        for side, what in (("tf_async", "TF async tf.train.Checkpoint write"),
                           ("sync", "disttrain ModelCheckpoint, sync"),
                           ("async", "disttrain async_commit=True (snapshot)"),
                           ("backup_sync", "disttrain BackupAndRestore, sync"),
                           ("backup_async", "disttrain BackupAndRestore async_commit=True")):
            rows_.append(ratio_row(f"  {what}: blocked", one[side]["blocked"], "model.save",
                                   plain, " ms", goal if side.endswith("async") and
                                   side != "tf_async" else None))
        for side, what in (("plain", "model.save"), ("tf_async", "TF async write"),
                           ("sync", "disttrain sync"), ("async", "disttrain async"),
                           ("backup_sync", "BackupAndRestore sync"),
                           ("backup_async", "BackupAndRestore async")):
            rows_.append(ratio_row(f"  {what}: until committed", one[side]["committed"],
                                   "model.save", plain, " ms"))
        rows_.append(ratio_row("  async save asked while one is in flight: blocked",
                               one["back_to_back"], "model.save", plain, " ms"))
        for side, what in (("async", "disttrain async"),
                           ("backup_async", "BackupAndRestore async")):
            rows_.append(ratio_row(f"  {what} blocked vs TF async blocked",
                                   one[side]["blocked"], "TF async", one["tf_async"]["blocked"],
                                   " ms", Goal(1.0)))
    return rows_


def _fit_rows(chief: dict[str, list[float]], settings: Settings) -> list[Row]:
    """Time per step of the chief's fits saving every epoch vs saving nothing."""
    none = [s * 1000 for s in chief["none"]]
    size = _megabytes(settings.fit_params * 4)
    rows_ = [Row(f"2-worker fit, {size} of weights, {settings.fit_steps} steps/epoch, no "
                 "saving: time per step", Stat.of(none).show(" ms", 1), "-")]
    for side, what in (("sync", "ModelCheckpoint every epoch, sync"),
                       ("async", "ModelCheckpoint every epoch, async_commit=True"),
                       ("backup_sync", "BackupAndRestore every epoch, sync"),
                       ("backup_async", "BackupAndRestore every epoch, async_commit=True")):
        rows_.append(ratio_row(f"  {what}: time per step", [s * 1000 for s in chief[side]],
                               "no saving", none, " ms",
                               Goal(1.05) if side.endswith("async") else None))
    return rows_
