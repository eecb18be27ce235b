"""Worker functions for exact resume: a shuffled, randomly augmented input on real clusters.

The input reshuffles every epoch (`shuffle(64, seed=1)`) and adds seeded random noise
(`tf.random.uniform(seed=5)` in a `map`), so every epoch differs from the others and a
resumed run equals an uninterrupted one only if it continues the same input stream.
The labels carry each sample's id, and the `Seen` metric counts how often each sample
was trained in the current epoch, summed over the workers.
"""

from __future__ import annotations

import numpy as np

from tests.support.models import dense_model
from tests.support.weights import weight_lists

SAMPLES = 192
GLOBAL_BATCH = 24  # divisible by 2 and 3: every worker count splits a batch evenly
EPOCHS = 3


class Interrupt(Exception):
    pass


def _fresh():
    """A new model, its `Seen` metric and a new input pipeline (as a restarted process
    builds them)."""
    import keras
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy

    class Seen(keras.metrics.Metric):
        """Per-sample training count of the epoch; its result is the number of samples."""

        def __init__(self):
            super().__init__(name="seen")
            self.counts = self.add_variable(shape=(SAMPLES,), initializer="zeros",
                                            name="counts")

        def update_state(self, y_true, y_pred, sample_weight=None):
            ids = tf.cast(y_true[:, 1], "int32")
            self.counts.assign_add(tf.math.bincount(ids, minlength=SAMPLES, maxlength=SAMPLES,
                                                    dtype=self.dtype))

        def result(self):
            return tf.reduce_sum(self.counts)

    def loss(y_true, y_pred):
        return keras.losses.binary_crossentropy(y_true[:, :1], y_pred)

    strategy = make_strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = np.stack([(x[:, 0] - x[:, 1] > 0), np.arange(SAMPLES)], axis=1).astype("float32")
    with strategy.scope():
        # No BatchNormalization: its batch statistics are per replica, so they change with
        # the number of workers (docs/resume.md#another-number-of-workers).
        model = dense_model(6, [8], activation="relu", output_activation="sigmoid", seed=3)
        seen = Seen()
        model.compile(keras.optimizers.Adam(0.01), loss, metrics=[seen])
    model.build((None, 6))
    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=1)
             .map(lambda a, b: (a + 0.05 * tf.random.uniform((6,), seed=5), b))
             .batch(GLOBAL_BATCH))
    return model, train, seen


def _counts(seen) -> list:
    """The Seen metric's per-sample counts (a collective read: every worker calls it)."""
    return np.asarray(seen.counts.numpy()).astype(int).tolist()


def _fit(backup_dir: str | None, interrupt_at: list | tuple | None = None,
         save_freq: str | int = 1, sigterm_rank: int | None = None) -> dict:
    """Trains a fresh model for EPOCHS epochs with a BackupAndRestore(backup_dir).

    `interrupt_at` (epoch, batch): after that batch (and its backup) every worker
    raises `Interrupt`, or, with `sigterm_rank`, that worker gets SIGTERM and waits
    until every worker acknowledged it (the backup is then taken after the next batch
    and every worker raises `Preempted`). Returns the weights, EarlyStopping's best
    epoch, the epochs run and each epoch's per-sample counts, or, interrupted by a raise,
    the per-sample counts of the epoch so far.
    """
    import os
    import signal

    import keras

    from disttrain import callbacks, coordination
    from disttrain.errors import Preempted

    interrupt_at = tuple(interrupt_at) if interrupt_at is not None else None
    model, train, seen = _fresh()
    rank = coordination.get().rank
    state = {"counts": None}

    class Stop(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) != interrupt_at:
                return
            if sigterm_rank is None:
                state["counts"] = _counts(seen)
                raise Interrupt()
            if rank == sigterm_rank:
                os.kill(os.getpid(), signal.SIGTERM)
                coordination.get().collect("preemption/ack")

    stack = [] if backup_dir is None else [callbacks.BackupAndRestore(
        backup_dir, save_freq=save_freq, delete_checkpoint=False, random_state=True)]
    stopper = callbacks.EarlyStopping(monitor="loss", patience=100)
    epoch_counts = []

    class Counts(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epoch_counts.append(_counts(seen))

    stack += [stopper, Stop(), Counts()]
    try:
        history = model.fit(train, epochs=EPOCHS, verbose=0, callbacks=stack)
    except (Interrupt, Preempted) as e:
        return {"interrupted": type(e).__name__, "counts": state["counts"]}
    return {"interrupted": None, "weights": weight_lists(model), "best_epoch": stopper.best_epoch,
            "epochs_run": len(history.history.get("loss", [])), "epoch_counts": epoch_counts}


def interrupted_and_resumed(backup_root: str, points: list, preempt_at: list) -> dict:
    """An uninterrupted run; for each (epoch, batch) of `points` a run interrupted there
    (a backup every batch, every worker raising after that batch) and a resumed one;
    last a run that worker 1's SIGTERM after `preempt_at` preempts at the next batch,
    whose backup `<backup_root>/preempted` stays. Each run starts from a fresh model and
    input in the same worker processes. (A process handles one preemption: the request
    is a one-time event.)"""
    import os

    results = {"reference": _fit(None)}
    for i, (epoch, batch) in enumerate(points):
        backup = os.path.join(backup_root, f"point-{i}")
        results[f"point-{i}"] = {"stopped": _fit(backup, (epoch, batch)),
                                 "resumed": _fit(backup)}
    results["preempted"] = _fit(os.path.join(backup_root, "preempted"), preempt_at,
                                save_freq="epoch", sigterm_rank=1)
    return results


def resumed_then_preempted(resume_dir: str, backup_dir: str, preempt_at: list) -> dict:
    """A run resuming from `resume_dir`, then a fresh run preempted like
    `interrupted_and_resumed`'s last, whose backup `backup_dir` stays."""
    return {"resumed": _fit(resume_dir),
            "preempted": _fit(backup_dir, preempt_at, save_freq="epoch",
                              sigterm_rank=1)}


def resumed(backup_dir: str) -> dict:
    """A fresh run resuming from `backup_dir`."""
    return _fit(backup_dir)
