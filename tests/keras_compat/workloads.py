"""Training functions that harness workers (and single-process references) run.

Each returns a JSON-serialisable summary: histories, evaluate/predict outputs
and every weight (trainable and not), so tests can compare workers exactly.
"""

from __future__ import annotations

import os

import numpy as np

from tests.support.models import dense_model

GLOBAL_BATCH = 32


def _data(n: int = 256, features: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("float32")
    w = rng.uniform(0.5, 1.5, size=(n,)).astype("float32")
    return x, y, w


def _summary(model, history, evaluation, predictions) -> dict:
    return {
        "history": history.history,
        "evaluate": evaluation,
        "predict": np.asarray(predictions).round(6).tolist(),
        "weights": {v.path: np.asarray(v.numpy()).tolist() for v in model.weights},
        "non_trainable": sorted(v.path for v in model.non_trainable_weights),
    }


def sequential(batchnorm: bool = True, epochs: int = 2, skip_fixes: tuple = (),
               steps_per_execution: int = 1) -> dict:
    """Sequential model fed from tf.data, with validation data, accuracy and AUC."""
    import keras
    import tensorflow as tf

    from disttrain import keras_compat
    from disttrain.distribute import strategy as make_strategy

    if skip_fixes:
        keras_compat.apply(skip=tuple(skip_fixes))
    strategy = make_strategy()
    x, y, _ = _data()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        layers = [keras.Input((8,)), keras.layers.Dense(16)]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers += [keras.layers.Activation("relu"), keras.layers.Dense(1, activation="sigmoid")]
        model = keras.Sequential(layers)
        model.compile(
            keras.optimizers.SGD(0.1), "binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
            steps_per_execution=steps_per_execution,
        )
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    val = tf.data.Dataset.from_tensor_slices((x[:96], y[:96])).batch(GLOBAL_BATCH)
    history = model.fit(train, epochs=epochs, validation_data=val, verbose=0)
    evaluation = model.evaluate(val, verbose=0, return_dict=True)
    predictions = model.predict(
        tf.data.Dataset.from_tensor_slices(x[:70]).batch(GLOBAL_BATCH), verbose=0
    )
    return _summary(model, history, evaluation, predictions)


def functional_dict(epochs: int = 2) -> dict:
    """Functional model with dict inputs, sample weights, steps_per_epoch and numpy validation."""
    import keras
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    x, y, w = _data()
    inputs = {"a": x[:, :4], "b": x[:, 4:]}
    with strategy.scope():
        keras.utils.set_random_seed(2)
        a = keras.Input((4,), name="a")
        b = keras.Input((4,), name="b")
        h = keras.layers.Concatenate()([keras.layers.Dense(8)(a), keras.layers.Dense(8)(b)])
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Activation("relu")(h)
        out = keras.layers.Dense(1, activation="sigmoid")(h)
        model = keras.Model({"a": a, "b": b}, out)
        model.compile(
            keras.optimizers.Adam(0.01), "binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
        )
    train = tf.data.Dataset.from_tensor_slices((inputs, y, w)).batch(GLOBAL_BATCH).repeat()
    val_inputs = {"a": x[:64, :4], "b": x[:64, 4:]}
    val = tf.data.Dataset.from_tensor_slices((val_inputs, y[:64])).batch(GLOBAL_BATCH)
    history = model.fit(train, epochs=epochs, steps_per_epoch=5, validation_data=val, verbose=0)
    evaluation = model.evaluate(val, verbose=0, return_dict=True)
    predictions = model.predict(
        tf.data.Dataset.from_tensor_slices(val_inputs).batch(GLOBAL_BATCH), verbose=0
    )
    return _summary(model, history, evaluation, predictions)


def fails_without_compat() -> dict:
    """Stock Keras 3 fit under MWMS; returns the exception it raises (or None)."""
    os.environ["DISTTRAIN_KERAS_COMPAT"] = "0"
    try:
        sequential(batchnorm=False, epochs=1)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    return {"error": None}


def multi_step_without_fix(steps_per_execution: int) -> dict:
    """Stock Keras's multi-step loop under MWMS; returns the exception it raises (or None)."""
    try:
        sequential(batchnorm=False, epochs=1, steps_per_execution=steps_per_execution,
                   skip_fixes=("multi_worker_steps_per_execution",))
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return {"error": f"{type(e).__name__}: {e}"[-500:]}
    return {"error": None}


def multi_step_with_xla() -> dict:
    """compile(steps_per_execution=4, jit_compile=True) under MWMS on CPU workers;
    returns the error, the warnings, the steps trained and the final jit_compile."""
    import warnings

    from disttrain.distribute import strategy

    x, y, _ = _data()
    with strategy().scope():
        model = dense_model(x.shape[1])
        model.compile("sgd", "mse", steps_per_execution=4, jit_compile=True)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        except Exception as e:  # noqa: BLE001 - the failure is the result
            error = f"{type(e).__name__}: {e}"[:500]
    return {"error": error, "warnings": [str(w.message) for w in caught],
            "trained": int(model.optimizer.iterations.numpy()),
            "jit_compile": bool(model.jit_compile)}


def _count_iterator_creations() -> tuple[dict[str, int], list[str]]:
    """Counts the input iterators Keras creates (`TFEpochIterator._get_iterator`
    calls) from now on in this process, per phase: returns the counts and a
    one-element list holding the current phase's name ("fit" to start), to reassign."""
    import collections

    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    created: collections.Counter = collections.Counter()
    phase = ["fit"]
    get_iterator = TFEpochIterator._get_iterator

    def counting(self):
        created[phase[0]] += 1
        return get_iterator(self)

    TFEpochIterator._get_iterator = counting
    return created, phase


def epoch_iterators(skip_fixes: tuple = (), shuffle_seed: int | None = None,
                    steps_per_execution: int = 1, numpy_input: bool = False) -> dict:
    """fit on 8 batches (a tf.data input, shuffled when `shuffle_seed` is set, or
    NumPy arrays in order) with NumPy validation of 3, stopped mid-epoch by a
    callback, then a second fit, evaluate and predict; also counts the input
    iterators Keras creates in each (`TFEpochIterator._get_iterator` calls)."""
    import keras
    import tensorflow as tf

    from disttrain import keras_compat
    from disttrain.distribute import strategy as make_strategy

    if skip_fixes:
        keras_compat.apply(skip=tuple(skip_fixes))
    strategy = make_strategy()
    created, phase = _count_iterator_creations()

    class StopInEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 2 and batch >= 4:
                self.model.stop_training = True

    x, y, _ = _data()
    with strategy.scope():
        model = dense_model(8, [16], activation="relu", output_activation="sigmoid", seed=3)
        model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy", metrics=["accuracy"],
                      steps_per_execution=steps_per_execution)
    train = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        train = train.shuffle(len(x), seed=shuffle_seed)
    train = train.batch(GLOBAL_BATCH)
    inputs = ({"x": x, "y": y, "batch_size": GLOBAL_BATCH, "shuffle": False} if numpy_input
              else {"x": train})
    history = model.fit(**inputs, epochs=5, validation_data=(x[:96], y[:96]), verbose=0,
                        callbacks=[StopInEpoch()])
    phase[0] = "fit_again"
    again = model.fit(**inputs, epochs=2, validation_data=(x[:96], y[:96]), verbose=0)
    phase[0] = "evaluate"
    evaluation = model.evaluate(x[:96], y[:96], batch_size=GLOBAL_BATCH, verbose=0,
                                return_dict=True)
    phase[0] = "predict"
    predictions = model.predict(
        tf.data.Dataset.from_tensor_slices(x[:70]).batch(GLOBAL_BATCH), verbose=0)
    summary = _summary(model, history, evaluation, predictions)
    summary["history_again"] = again.history
    summary["iterators_created"] = dict(created)
    return summary


def epoch_state_pipeline() -> dict:
    """A pipeline that reads a variable a callback raises after every epoch (x = y =
    level); the model predicts 0 and never learns (SGD with learning rate 0), so each
    batch's running loss is level**2 when every batch of an epoch sees that epoch's
    level. Also counts the input iterators Keras creates."""
    import keras
    import tensorflow as tf

    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    created, _ = _count_iterator_creations()
    level = tf.Variable(0.0, trainable=False)
    train = (tf.data.Dataset.from_tensor_slices(np.zeros((256, 1), "float32"))
             .map(lambda v: (v + level, v + level)).batch(GLOBAL_BATCH).prefetch(2))
    with strategy.scope():
        model = dense_model(1, kernel_initializer="zeros")
        model.compile(keras.optimizers.SGD(0.0), "mse")
    losses: list[list[float]] = []

    class Raise(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            losses.append([])

        def on_train_batch_end(self, batch, logs=None):
            losses[-1].append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            level.assign(float(epoch + 1))

    model.fit(train, epochs=3, verbose=0, callbacks=[Raise()])
    return {"losses": losses, "iterators_created": created["fit"]}


STEPS_PER_EXECUTION = (3, 8, 20)
"""The multi-step calls `test_steps_per_execution_matches_one_step_per_call` checks."""
ITERATOR_VARIANTS = ((1, False), (3, False), (1, True))
"""`(steps_per_execution, numpy_input)` of the persistent epoch iterator's tests."""


def iterator_case(steps_per_execution: int, numpy_input: bool) -> str:
    """The case name of one `ITERATOR_VARIANTS` entry."""
    return f"epoch_iterators_{steps_per_execution}_{'numpy' if numpy_input else 'dataset'}"


def with_every_fix(directory: str) -> dict:
    """Every 2-worker case of test_keras_compat.py that runs with all fixes, in one
    cluster (tests/support/cases.py): the workloads above, each in a new model;
    `concurrent_saves` writes into `directory`."""
    from tests.support.cases import run_cases

    cases = {
        "sequential_batchnorm": lambda: sequential(batchnorm=True),
        "sequential": lambda: sequential(batchnorm=False),
        "functional_dict": functional_dict,
        **{f"steps_per_execution_{k}": (
            lambda k=k: sequential(batchnorm=True, steps_per_execution=k))
           for k in STEPS_PER_EXECUTION},
        **{iterator_case(k, numpy): (
            lambda k=k, numpy=numpy: epoch_iterators(steps_per_execution=k, numpy_input=numpy))
           for k, numpy in ITERATOR_VARIANTS},
        "epoch_iterators_shuffled": lambda: epoch_iterators(shuffle_seed=5),
        "epoch_state_pipeline": epoch_state_pipeline,
        "multi_step_with_xla": multi_step_with_xla,
        "concurrent_saves": lambda: concurrent_saves(directory),
    }
    return run_cases(cases)


def without_persistent_iterator() -> dict:
    """The `ITERATOR_VARIANTS` of `epoch_iterators` with Keras's own iterators (the fix
    `persistent_epoch_iterator` skipped for the process), in one cluster."""
    from tests.support.cases import run_cases

    return run_cases({iterator_case(k, numpy): (
        lambda k=k, numpy=numpy: epoch_iterators(("persistent_epoch_iterator",), None, k, numpy))
        for k, numpy in ITERATOR_VARIANTS})


def without_three_fixes(directory: str) -> dict:
    """The three cases that show a fix is still needed, with the three fixes skipped for
    the process, in one cluster: each skipped fix does nothing in the others' cases (the
    multi-step fix acts only with steps_per_execution > 1, the statistics sync only on a
    model with BatchNormalization, the atomic saves only in a save); `concurrent_saves`
    writes into `directory`."""
    from disttrain import keras_compat
    from tests.support.cases import run_cases

    keras_compat.apply(skip=("synced_batchnorm_statistics", "multi_worker_steps_per_execution",
                             "multi_worker_atomic_saves"))
    return run_cases({
        "batchnorm_statistics": lambda: sequential(batchnorm=True),
        "multi_step": lambda: multi_step_without_fix(steps_per_execution=4),
        "concurrent_saves": lambda: concurrent_saves(directory),
    })


SAVE_FORMATS = (".keras", ".weights.h5", ".h5")
"""The local files Keras writes in place: a model, its weights, a legacy HDF5 model."""


def concurrent_saves(directory: str, rounds: int = 6) -> dict:
    """Every worker saves the same trained model to the same paths in `directory`, as a
    script's `model.save` after `fit` does on every worker: `rounds` paths per format, each
    round started together on every worker (a barrier). After a second barrier each worker
    reads every file back; then every worker saves through a symbolic link.

    Returns:
        per format: the errors the saves raised (`Type: message`), the files that did not
        read back whole with this worker's weights (`name: why`); every name left in
        `directory` (temp files would show here); and where `latest.keras` points after a
        save through it (a symbolic link to the first `.keras` file).
    """
    import keras

    from disttrain import coordination
    from disttrain.distribute import strategy as make_strategy

    strategy = make_strategy()
    x, y, _ = _data()
    with strategy.scope():
        model = dense_model(8, [1024, 1024], seed=1)
        model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    expected = [np.asarray(v) for v in model.get_weights()]
    coord = coordination.get()
    results: dict = {}
    for fmt in SAVE_FORMATS:
        errors = []
        for i in range(rounds):
            path = os.path.join(directory, f"model-{i}{fmt}")
            coord.barrier(f"concurrent_saves {fmt} {i}")
            try:
                if fmt == ".weights.h5":
                    model.save_weights(path)
                else:
                    model.save(path)
            except Exception as e:  # noqa: BLE001 - reported per format
                errors.append(f"{type(e).__name__}: {e}"[:300])
        results[fmt] = {"save_errors": errors}
    coord.barrier("concurrent_saves read")
    for fmt in SAVE_FORMATS:
        unreadable = []
        for i in range(rounds):
            path = os.path.join(directory, f"model-{i}{fmt}")
            try:
                if fmt == ".weights.h5":
                    loaded = dense_model(8, [1024, 1024])
                    loaded.load_weights(path)
                else:
                    loaded = keras.saving.load_model(path, compile=False)
                same = all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), expected))
                if not same:
                    unreadable.append(f"{os.path.basename(path)}: other weights")
            except Exception as e:  # noqa: BLE001 - reported per file
                unreadable.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}"[:300])
        results[fmt]["unreadable"] = unreadable
    coord.barrier("concurrent_saves checked")
    if coord.is_chief:
        os.symlink(f"model-0{SAVE_FORMATS[0]}", os.path.join(directory, "latest.keras"))
    coord.barrier("concurrent_saves link")
    model.save(os.path.join(directory, "latest.keras"))
    coord.barrier("concurrent_saves done")
    return {"formats": results, "left": sorted(os.listdir(directory)),
            "link": os.readlink(os.path.join(directory, "latest.keras"))}


def one_process_saves(directory: str) -> dict:
    """One process with every fix: saves each format and counts the saves that went through
    a temp file (`disttrain.storage.StagedFile`, watched), which must be none."""
    import disttrain.storage
    from disttrain import keras_compat
    from disttrain.distribute import strategy as make_strategy

    staged = []

    class Watched(disttrain.storage.StagedFile):
        def __init__(self, url, *args, **kwargs):
            staged.append(url)
            super().__init__(url, *args, **kwargs)

    disttrain.storage.StagedFile = Watched
    with make_strategy().scope():
        model = dense_model(8, seed=1)
        model.compile("sgd", "mse")
    x, y, _ = _data()
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    for fmt in SAVE_FORMATS:
        path = os.path.join(directory, f"model{fmt}")
        if fmt == ".weights.h5":
            model.save_weights(path)
        else:
            model.save(path)
    return {"staged": staged, "left": sorted(os.listdir(directory)),
            "atomic_saves_installed": any(p.by == "multi_worker_atomic_saves"
                                          for p in keras_compat.patches())}
