"""Worker function: generators and PyDatasets whose later batches differ between workers.

The first batch (and a PyDataset's last) agree on every worker, so the check at the
call's start passes; a later batch differs on worker 1, as a generator reading a
per-worker random stream or a file list sharded by accident gives it. One cluster
runs every case in turn (each case's fit raises or trains on every worker alike, so
the next case starts together); the test reads the returned record.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tests.support.models import one_process_scope

SAMPLES = 48
GLOBAL_BATCH = 8
BATCHES = SAMPLES // GLOBAL_BATCH
STEPS_PER_EPOCH = 3
EPOCHS = 3
DIFFERS_AT = 4
"""The generator's batch (0-based) that differs on worker 1: epoch 2, step 2."""
PYDATASET_DIFFERS_AT = 2
"""The PyDataset's batch (0-based) that differs on worker 1 (not its first or last)."""
SHORT = 7
VALIDATION_DIFFERS_AT = 3
"""The validation generator's batch (0-based) that differs on worker 1 (after Keras's
two peeked batches and the input check's first)."""
"""Batches worker 1's short generator yields (worker 0's yields STEPS_PER_EPOCH * EPOCHS)."""


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(SAMPLES, dtype="float32")
    x = np.stack([ids / SAMPLES, np.cos(ids)], axis=1).astype("float32")
    return x, ids.reshape(-1, 1)


def _batch(index: int, other: bool) -> tuple[np.ndarray, np.ndarray]:
    """Batch `index % BATCHES`; `other`: the rows of the next batch instead."""
    x, y = _arrays()
    start = ((index + other) % BATCHES) * GLOBAL_BATCH
    return x[start:start + GLOBAL_BATCH], y[start:start + GLOBAL_BATCH]


def _generator(rank: int, differs_at: int | None = None, length: int | None = None):
    total = STEPS_PER_EPOCH * EPOCHS
    for index in range(total if length is None or not rank else length):
        yield _batch(index, other=bool(rank) and index == differs_at)


def _model(keras, scope):
    with scope:
        model = keras.Sequential([keras.Input((2,)),
                                  keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.002), "mse")
    return model


def _outcome(fn) -> dict[str, Any]:
    """What `fn` did: the InputMismatchError's type and message (None when it trained),
    and the seconds it took."""
    from disttrain.errors import InputMismatchError

    start = time.perf_counter()
    try:
        fn()
        error = kind = None
    except InputMismatchError as e:
        error, kind = str(e), type(e).__name__
    return {"error": error, "type": kind, "seconds": round(time.perf_counter() - start, 2)}


def run() -> dict[str, Any]:
    """Every case; returns, for each, the InputMismatchError message or None:

    - `generator`: batch `DIFFERS_AT` differs on worker 1 (epoch 2, step 2);
    - `pydataset`: batch `PYDATASET_DIFFERS_AT` of 6 differs on worker 1 (2 epochs);
    - `short generator`: worker 1's generator ends after `SHORT` batches;
    - `evaluate generator`: evaluate on a generator whose batch 4 differs;
    - `validation generator`: fit on arrays whose `validation_data` generator's batch
      `VALIDATION_DIFFERS_AT` differs on worker 1 (the first validation, step 4);
    - `validation pydataset`: the same with the PyDataset of `pydataset` as validation;
    - `short validation generator`: worker 1's validation generator ends after `SHORT`
      batches;
    - `callback list`: the `generator` case with `callbacks=keras.callbacks.CallbackList()`;
    - `equal`: a generator and a PyDataset that agree (each with an agreeing
      validation input of the other kind) train without an error, and
      `weights` holds the weights of that training on the workers and in one process.
    """
    import keras

    from disttrain import coordination
    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    rank = coordination.get().rank

    class Batches(keras.utils.PyDataset):
        def __init__(self, differs_at=None):
            super().__init__()
            self.differs_at = differs_at

        def __len__(self):
            return BATCHES

        def __getitem__(self, index):
            return _batch(index, other=bool(rank) and index == self.differs_at)

    model = _model(keras, strategy.scope())
    fit = {"steps_per_epoch": STEPS_PER_EPOCH, "epochs": EPOCHS, "verbose": 0}
    record: dict[str, Any] = {
        "generator": _outcome(lambda: model.fit(_generator(rank, DIFFERS_AT), **fit)),
        "pydataset": _outcome(lambda: model.fit(Batches(PYDATASET_DIFFERS_AT), epochs=2,
                                                shuffle=False, verbose=0)),
        "short generator": _outcome(lambda: model.fit(_generator(rank, length=SHORT), **fit)),
        "evaluate generator": _outcome(lambda: model.evaluate(
            _generator(rank, DIFFERS_AT), steps=STEPS_PER_EPOCH * EPOCHS, verbose=0)),
        "validation generator": _outcome(lambda: model.fit(
            *_arrays(), batch_size=GLOBAL_BATCH, shuffle=False, verbose=0,
            validation_data=_generator(rank, VALIDATION_DIFFERS_AT))),
        "validation pydataset": _outcome(lambda: model.fit(
            *_arrays(), batch_size=GLOBAL_BATCH, shuffle=False, verbose=0,
            validation_data=Batches(PYDATASET_DIFFERS_AT))),
        "short validation generator": _outcome(lambda: model.fit(
            *_arrays(), batch_size=GLOBAL_BATCH, shuffle=False, verbose=0,
            validation_data=_generator(rank, length=SHORT))),
        "callback list": _outcome(lambda: model.fit(
            _generator(rank, DIFFERS_AT), callbacks=keras.callbacks.CallbackList(), **fit)),
    }
    weights = {}
    for where, scope in (("workers", strategy.scope()), ("one process", one_process_scope())):
        trained = _model(keras, scope)
        equal = [_outcome(lambda: trained.fit(_generator(rank), validation_data=Batches(),
                                              **fit)),
                 _outcome(lambda: trained.fit(Batches(), epochs=2, shuffle=False, verbose=0,
                                              validation_data=_generator(rank)))]
        record.setdefault("equal", equal)
        weights[where] = [w.tolist() for w in trained.get_weights()]
    record["weights"] = weights
    return record
