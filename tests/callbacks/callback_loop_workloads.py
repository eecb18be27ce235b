"""Worker functions for callbacks beyond `fit`'s happy path: custom training loops, several
ModelCheckpoints in one directory, chief-only callbacks, multi-metric EarlyStopping.

`beyond_fit_job` runs every case on one cluster, one after the other, and returns each
case's result (or its error) so the test reads them all from one run.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np

from tests.support.models import dense_model
from tests.support.weights import weight_lists

# Per-worker validation losses of the custom loop: the chief's best epoch is 2 (index 1)
# and it stops after epoch 4; worker 1 alone would keep epoch 3 and stop after epoch 5.
SCRIPTED_VAL_LOSS = [[1.0, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0, 1.0],
                     [1.0, 0.9, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]]


def _listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def custom_loop_per_worker_logs(directory: str, epochs: int = 8) -> dict:
    """A GradientTape loop driving CallbackList; each worker logs its OWN val_loss
    (`SCRIPTED_VAL_LOSS[rank]`), the script never sets `model.stop_training`."""
    import keras
    import tensorflow as tf

    import disttrain
    from disttrain import callbacks, coordination

    rank = coordination.get().rank
    strategy = disttrain.strategy()
    with strategy.scope():
        model = dense_model(4, seed=2)
        optimizer = keras.optimizers.SGD(0.05)
    model.optimizer = optimizer
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True))).batch(16))

    @tf.function
    def train_step(x, y):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(tf.square(model(x) - y)[:, 0],
                                                  global_batch_size=16)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(step, args=(x, y)), axis=None)

    stop = callbacks.EarlyStopping(patience=2, restore_best_weights=True)
    checkpoint = callbacks.ModelCheckpoint(
        os.path.join(directory, "m-{epoch}-{val_loss:.2f}.keras"), save_best_only=True)
    weights_at_end = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights_at_end.append(weight_lists(self.model))

    callback_list = keras.callbacks.CallbackList(
        [Record(), stop, checkpoint, callbacks.ReduceLROnPlateau(patience=1)], model=model)
    callback_list.on_train_begin()
    epochs_run = 0
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        losses = [float(train_step(x, y)) for x, y in data]
        callback_list.on_epoch_end(epoch, {"loss": float(np.mean(losses)),
                                           "val_loss": SCRIPTED_VAL_LOSS[rank][epoch]})
        epochs_run += 1
        if getattr(model, "stop_training", False):
            break
    callback_list.on_train_end()
    restored = weight_lists(model)
    return {"epochs_run": epochs_run, "weights": restored,
            "restored_epoch": next(i for i, w in enumerate(weights_at_end) if w == restored),
            "best_epoch": stop.best_epoch, "best": checkpoint.best_checkpoint(),
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "listing": _listing(directory)}


def example_loop(directory: str) -> dict:
    """examples/custom_training_loop.py's `train`, as a user runs it."""
    from examples.custom_training_loop import train

    result = train(directory, epochs=6, patience=2)
    return {**result, "listing": _listing(directory)}


def _fit_model():
    """A small compiled model under `disttrain.strategy()` and its data (as arrays)."""
    import keras

    import disttrain

    with disttrain.strategy().scope():
        model = dense_model(4, output_activation="sigmoid", seed=3)
        model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
    return model, x, (x[:, 0] > 0).astype("float32")


def best_and_last(directory: str, epochs: int = 4) -> dict:
    """"best" + "last" + a second monitor's ModelCheckpoints in one directory."""
    import json

    from disttrain import callbacks

    model, x, y = _fit_model()
    stack = [callbacks.ModelCheckpoint(os.path.join(directory, "best.keras"),
                                       save_best_only=True),
             callbacks.ModelCheckpoint(os.path.join(directory, "last.keras")),
             callbacks.ModelCheckpoint(os.path.join(directory, "acc-{epoch}.keras"),
                                       monitor="val_accuracy", save_best_only=True,
                                       max_to_keep=1)]
    history = model.fit(x, y, batch_size=16, epochs=epochs, validation_data=(x, y),
                        verbose=0, callbacks=stack).history
    manifests = {c.manifest_name: json.load(open(c.manifest_url)) for c in stack}
    return {"history": history, "manifests": manifests, "listing": _listing(directory),
            "best": [c.best_checkpoint() for c in stack]}


ALERT_LOG = "alerts.log"


def chief_only_alert(directory: str, epochs: int = 3) -> dict:
    """An alert callback and a decorated function under on_chief; configuration warnings."""
    import warnings

    import keras

    from disttrain import callbacks

    os.makedirs(directory, exist_ok=True)
    log = os.path.join(directory, ALERT_LOG)

    def write(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")

    @callbacks.on_chief
    def notify(text: str) -> str:
        write(text)
        return text

    class Alert(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            write("begin")

        def on_epoch_end(self, epoch, logs=None):
            write(f"epoch {epoch + 1}")
            notify(f"nested {epoch + 1}")

    model, x, y = _fit_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=epochs, validation_data=(x, y), verbose=0,
                  callbacks=[callbacks.on_chief(Alert()),
                             callbacks.EarlyStopping(monitor="loss", patience=10)])
    returned = notify("done")
    return {"returned": returned,
            "training_metric_warnings": sum("monitors the training metric" in str(w.message)
                                            for w in caught)}


# Per-worker scripted metrics for multi-metric EarlyStopping (patience 1): on the chief
# val_a (min) improves at epochs 1-2, val_b (max) at epoch 3, none at epoch 4: it stops
# after epoch 4 (either metric alone would stop sooner); worker 1's keep improving.
SCRIPTED_A = [[1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0],
              [1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]]
SCRIPTED_B = [[0.1, 0.1, 0.2, 0.15, 0.15, 0.15, 0.15, 0.15],
              [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]


def multi_metric(directory: str, epochs: int = 8) -> dict:
    """EarlyStopping(monitor=[val_a, val_b]) on per-worker scripted metrics; then an
    array-valued metric, refused."""
    import keras

    from disttrain import callbacks, coordination

    rank = coordination.get().rank

    class Script(keras.callbacks.Callback):
        """Puts this worker's scripted metrics into the epoch's logs (before EarlyStopping)."""

        def __init__(self, vector: bool = False):
            super().__init__()
            self.vector = vector

        def on_epoch_end(self, epoch, logs=None):
            logs["val_a"] = SCRIPTED_A[rank][epoch]
            logs["val_b"] = np.array([0.1, 0.2]) if self.vector else SCRIPTED_B[rank][epoch]

    model, x, y = _fit_model()
    stop = callbacks.EarlyStopping(monitor=["val_a", "val_b"], mode=["min", "max"],
                                   min_delta=[0.01, 0.0], patience=1)
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                        callbacks=[Script(), stop]).history
    result = {"epochs_run": len(history["loss"]), "best_epoch": stop.best_epoch,
              "best": stop.best, "weights": weight_lists(model)}
    try:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
            Script(vector=True),
            callbacks.EarlyStopping(monitor=["val_a", "val_b"], mode=["min", "max"])])
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["vector_error"] = f"{type(e).__name__}: {e}"
    return result


def collective_in_chief_only(directory: str) -> dict:
    """Wrapped callbacks calling a strategy collective, model.evaluate or a disttrain
    agreement: each fit fails on every worker; how long each took."""
    import keras

    from disttrain import callbacks, coordination

    class Reduce(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.distribute_strategy.reduce("SUM", 1.0, axis=None)

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.evaluate(np.ones((8, 4)), np.ones(8), verbose=0)

    class Vote(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            coordination.get().any(True, "user vote")

    model, x, y = _fit_model()
    outcomes = {}
    for name, wrapped in (("reduce", Reduce()), ("evaluate", Evaluate()), ("vote", Vote())):
        started = time.monotonic()
        try:
            model.fit(x, y, batch_size=16, epochs=2, validation_data=(x, y), verbose=0,
                      callbacks=[callbacks.on_chief(wrapped)])
            outcomes[name] = {"error": None}
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcomes[name] = {"error": f"{type(e).__name__}: {e}"}
        outcomes[name]["seconds"] = time.monotonic() - started
    return outcomes


def scripted_val_loss(epoch: int) -> float:
    """The val_loss `best_and_last_forever` logs at `epoch` (0-based): improves now and then."""
    return 1.0 / (1 + (epoch * 37) % 101) + epoch * 1e-4


def best_and_last_forever(directory: str, epochs: int = 150) -> dict:
    """ModelCheckpoint('best.keras', save_best_only) + ModelCheckpoint('last.keras') driven
    through a CallbackList, resuming after the epoch that the "last" manifest names. Every
    weight holds the epoch number (1-based) at its save, so a test can check that each file
    holds what its manifest says. Prints READY first; the test SIGKILLs and restarts it."""
    import json
    import sys

    import keras

    from disttrain import callbacks

    model = dense_model(2)
    model.compile("sgd", "mse")
    best = callbacks.ModelCheckpoint(os.path.join(directory, "best.keras"), save_best_only=True)
    last = callbacks.ModelCheckpoint(os.path.join(directory, "last.keras"))
    callback_list = keras.callbacks.CallbackList([best, last], model=model)
    manifest = os.path.join(directory, last.manifest_name)
    start = json.load(open(manifest))["epoch"] if os.path.exists(manifest) else 0
    callback_list.on_train_begin()
    print("READY", flush=True)
    sys.stdout.flush()
    for epoch in range(start, epochs):
        model.set_weights([np.full(w.shape, epoch + 1, w.dtype) for w in model.get_weights()])
        callback_list.on_epoch_end(epoch, {"val_loss": scripted_val_loss(epoch), "loss": 1.0})
    callback_list.on_train_end()
    return {"manifests": [best.manifest_name, last.manifest_name]}


CASES = {
    "custom_loop": custom_loop_per_worker_logs,
    "example": example_loop,
    "best_and_last": best_and_last,
    "alert": chief_only_alert,
    "multi_metric": multi_metric,
    "collective": collective_in_chief_only,
}


def beyond_fit_job(directory: str, cases: list[str]) -> dict:
    """Runs each named case (`CASES`) with its own subdirectory of `directory`; a case's
    error is recorded (type, message, seconds it took) and the next case still runs."""
    results = {}
    for name in cases:
        started = time.monotonic()
        try:
            results[name] = CASES[name](os.path.join(directory, name))
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = {"error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(),
                             "seconds": time.monotonic() - started}
    return results
