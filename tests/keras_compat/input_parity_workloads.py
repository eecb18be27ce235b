"""Worker function: NumPy arrays, PyDatasets and generators on N workers against one process.

One cluster runs every case in turn (each case's fit raises or trains on every worker
alike, so the next case starts together); the test reads the returned record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.support.models import dense_model, one_process_scope

SAMPLES = 48
GLOBAL_BATCH = 8
EPOCHS = 3
FULL_PASS = SAMPLES * (SAMPLES - 1) // 2
"""The sum of the sample ids of one epoch that trains every sample once."""


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    """Sample ids as a feature and as the target (the metric sums the targets)."""
    ids = np.arange(SAMPLES, dtype="float32")
    x = np.stack([ids / SAMPLES, np.cos(ids)], axis=1).astype("float32")
    return x, ids.reshape(-1, 1)


def _model(keras, scope):
    """A linear model whose SGD weights depend on the batch order, and a metric whose epoch
    mean is the mean sample id trained (all workers' together)."""

    def trained_ids(y_true, y_pred):
        return keras.ops.cast(y_true, "float32")

    with scope:
        model = dense_model(2, kernel_initializer="ones")
        model.compile(keras.optimizers.SGD(0.002), "mse", metrics=[trained_ids])
    return model


def _error(fn) -> str | None:
    """The InputMismatchError message `fn` raises, or None when it trains."""
    from disttrain.errors import InputMismatchError

    try:
        fn()
    except InputMismatchError as e:
        return str(e)
    return None


def run() -> dict[str, Any]:
    """Every case; returns what the test compares:

    - `unseeded_ids`: per-epoch sums of the trained sample ids, `fit(x, y, shuffle=True)`
      with no global seed (a full pass each epoch is `FULL_PASS`);
    - `pydataset_ids`: the same for a shuffled PyDataset (its batch order);
    - `generator_ids`: the same for a generator (the check drew its first batch and put
      it back);
    - `errors`: the InputMismatchError message (or None) of each case whose inputs
      differ between workers, and `trained_while_refused`: whether the weights moved;
    - `seeded`: with `keras.utils.set_random_seed`, the 2-worker weights after
      `EPOCHS` shuffled epochs and the weights of the same `fit` in one process (a
      `OneDeviceStrategy` in this same process, `one_process_scope`).
    """
    import keras

    from disttrain import coordination
    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    rank = coordination.get().rank
    x, y = _arrays()
    record: dict[str, Any] = {}

    def ids_per_epoch(model, *args, **kwargs) -> list[float]:
        history = model.fit(*args, epochs=EPOCHS, verbose=0, **kwargs).history
        return [mean * SAMPLES for mean in history["trained_ids"]]

    model = _model(keras, strategy.scope())
    record["unseeded_ids"] = ids_per_epoch(model, x, y, batch_size=GLOBAL_BATCH, shuffle=True)
    record["batch_shuffle"] = _batch_shuffle_orders(keras, strategy, x, y)

    class Batches(keras.utils.PyDataset):
        def __init__(self, order):
            super().__init__()
            self.order = order

        def __len__(self):
            return SAMPLES // GLOBAL_BATCH

        def __getitem__(self, index):
            rows = self.order[index * GLOBAL_BATCH:(index + 1) * GLOBAL_BATCH]
            return x[rows], y[rows]

    record["pydataset_ids"] = ids_per_epoch(model, Batches(np.arange(SAMPLES)), shuffle=True)

    def generator(order):
        for _ in range(EPOCHS):
            for start in range(0, SAMPLES, GLOBAL_BATCH):
                rows = order[start:start + GLOBAL_BATCH]
                yield x[rows], y[rows]

    steps = SAMPLES // GLOBAL_BATCH
    history = model.fit(generator(np.arange(SAMPLES)), steps_per_epoch=steps, epochs=EPOCHS,
                        verbose=0).history
    record["generator_ids"] = [mean * SAMPLES for mean in history["trained_ids"]]

    # Inputs that differ on worker 1: its own draw, as an unseeded script makes it.
    own = np.random.default_rng(rank).permutation(SAMPLES) if rank else np.arange(SAMPLES)
    before = [w.tolist() for w in model.get_weights()]
    record["errors"] = {
        "x with validation_split": _error(lambda: model.fit(
            x[own], y, validation_split=0.25, epochs=1, verbose=0)),
        "validation_data": _error(lambda: model.fit(
            x, y, validation_data=(x, y[own]), epochs=1, verbose=0)),
        "pydataset": _error(lambda: model.fit(Batches(own), epochs=1, verbose=0)),
        "generator": _error(lambda: model.fit(generator(own), steps_per_epoch=steps,
                                              epochs=1, verbose=0)),
        "evaluate sample_weight": _error(lambda: model.evaluate(
            x, y, sample_weight=own.astype("float32"), verbose=0)),
    }
    keras.utils.set_random_seed(1 + rank)
    record["errors"]["global seed"] = _error(lambda: model.fit(x, y, epochs=1, verbose=0))

    class Reordered(Batches):
        """keras-io's pattern: a new order after each epoch from NumPy's global RNG."""

        def on_epoch_end(self):
            np.random.shuffle(self.order)

    np.random.seed(None)  # each process's own draw, as in a script without a seed
    record["errors"]["pydataset reordered"] = _error(
        lambda: model.fit(Reordered(np.arange(SAMPLES)), epochs=EPOCHS, shuffle=False,
                          verbose=0))
    record["trained_while_refused"] = before != [w.tolist() for w in model.get_weights()]

    class SeededReorder(Batches):
        """The fix the error names: the new order drawn from a seed every worker shares."""

        def on_epoch_end(self):
            self.epoch = getattr(self, "epoch", 0) + 1
            np.random.default_rng(self.epoch).shuffle(self.order)

    record["reordered_ids"] = ids_per_epoch(model, SeededReorder(np.arange(SAMPLES)),
                                           shuffle=False)
    record["epoch_check_ms"] = _epoch_check_ms(SeededReorder(np.arange(SAMPLES)))

    weights = {}
    for where, scope in (("workers", strategy.scope()), ("one process", one_process_scope())):
        keras.utils.set_random_seed(5)
        seeded = _model(keras, scope)
        seeded.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=True, epochs=EPOCHS, verbose=0)
        weights[where] = [w.tolist() for w in seeded.get_weights()]
    record["seeded"] = weights
    return record


def _epoch_check_ms(dataset, repeats: int = 15) -> float:
    """The median milliseconds of the per-epoch check of a `PyDataset` (both workers
    call it together)."""
    import time

    from disttrain.keras_compat.input_check import check_epoch

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        check_epoch(dataset, "fit", 2)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[repeats // 2]


def _recording_model(keras, scope, seen: list):
    """`_model` with a first layer that appends, at each training step, the sample ids of
    the batch this replica trains on to `seen` (the order the input gives each worker)."""
    import tensorflow as tf

    class Recorded(keras.layers.Layer):
        def call(self, inputs, training=None):
            if not training:
                return inputs

            def note(batch):
                seen.append(np.rint(batch.numpy()[:, 0] * SAMPLES).astype(int).tolist())
                return 0

            noted = tf.py_function(note, [inputs], tf.int32)
            with tf.control_dependencies([noted]):
                return tf.identity(inputs)

    with scope:
        model = keras.Sequential([keras.Input((2,)), Recorded(),
                                  keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.002), "mse")
    return model


def _batch_shuffle_orders(keras, strategy, x, y) -> dict[str, list]:
    """`fit(x, y, shuffle="batch")`: the ids each worker trains at each step, without a
    global seed (`unseeded`; none must be set yet), and with one on the workers and in
    one process."""
    record: dict[str, list] = {}
    seen: list = []
    _recording_model(keras, strategy.scope(), seen).fit(
        x, y, batch_size=GLOBAL_BATCH, shuffle="batch", epochs=EPOCHS, verbose=0)
    record["unseeded"] = seen
    for where, scope in (("workers", strategy.scope()), ("one process", one_process_scope())):
        keras.utils.set_random_seed(5)
        seen = []
        _recording_model(keras, scope, seen).fit(
            x, y, batch_size=GLOBAL_BATCH, shuffle="batch", epochs=EPOCHS, verbose=0)
        record[where] = seen
    return record
