"""Worker function for several replicas in one process: MirroredStrategy over logical CPUs.

A CPU stand-in for one host with several GPUs (ARCHITECTURE.md: Keras 3 `fit` with disttrain's
callbacks runs there): the process splits its CPU into 2 logical devices and asks
`disttrain.strategy(local_devices=[...])` for a replica on each.
"""

from __future__ import annotations

import os

import numpy as np

from tests.support.models import dense_model


def fit_with_callbacks(workdir: str, logical_cpus: int) -> dict:
    """Trains with disttrain's checkpoint, backup, early stopping, LR and CSV callbacks.

    Args:
        workdir: where the callbacks write (a directory of its own per call).
        logical_cpus: 2 for MirroredStrategy over 2 logical CPUs; 1 for the default
            strategy (`local_devices="one"`), the reference.

    Returns:
        The strategy's class and replica count, the history, the final weights, the best
        checkpoint's weights and the files written.
    """
    import keras
    import tensorflow as tf

    import disttrain

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
        devices = [f"/cpu:{i}" for i in range(logical_cpus)]
    else:
        devices = "one"
    strategy = disttrain.strategy(local_devices=devices)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")
    with strategy.scope():
        # No BatchNormalization: its batch statistics are per replica (16 samples, not 32),
        # as in Keras and tf_keras, so it would differ from one device by design.
        model = dense_model(6, [8], activation="relu", output_activation="sigmoid", seed=1)
        model.compile(keras.optimizers.SGD(0.2), "binary_crossentropy", metrics=["accuracy"])
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(32)
    best = os.path.join(workdir, "{run_id}", "best.keras")
    history = model.fit(train, validation_data=val, epochs=6, verbose=0, callbacks=[
        disttrain.callbacks.BackupAndRestore(os.path.join(workdir, "{run_id}", "backup")),
        disttrain.callbacks.ModelCheckpoint(best, monitor="val_loss", save_best_only=True),
        disttrain.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=1.0),
        disttrain.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=0, factor=0.5,
                                              min_delta=1.0),
        disttrain.callbacks.CSVLogger(os.path.join(workdir, "log.csv")),
    ])
    run_id = disttrain.coordination.get().run_id()
    restored = keras.models.load_model(best.format(run_id=run_id))
    written = sorted(os.path.relpath(os.path.join(d, f), workdir).replace(run_id, "RUN")
                     for d, _, files in os.walk(workdir) for f in files)
    return {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
            "history": history.history, "weights": [w.tolist() for w in model.get_weights()],
            "best": [w.tolist() for w in restored.get_weights()],
            "lr": float(model.optimizer.learning_rate.numpy()), "written": written}
