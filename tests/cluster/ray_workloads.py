"""The train loop that Ray Train's TensorflowTrainer runs in tests/cluster/test_ray.py.

Ray pickles it by reference, so its workers import it from this module (the test
puts the repository on their PYTHONPATH).
"""

from __future__ import annotations

import os


def train_loop(config: dict) -> None:
    """Epochs under `disttrain.strategy()` with Ray's TF_CONFIG.

    Each worker checkpoints into `config["directory"]/rank<world rank>` (only the chief's
    may fill) and reports each epoch's logs to Ray; the chief attaches the directory its
    ModelCheckpoint has just committed, so Ray keeps it (and the metrics) as the run's
    checkpoint.
    """
    import keras
    import numpy as np
    import ray.train
    import tensorflow as tf

    import disttrain
    from disttrain import coordination

    rank = ray.train.get_context().get_world_rank()
    strategy = disttrain.strategy()
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    facts = {"rank": rank, "is_chief": coordination.get().is_chief,
             "replicas": strategy.num_replicas_in_sync}

    own = os.path.join(config["directory"], f"rank{rank}")

    class ReportToRay(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            checkpoint = ray.train.Checkpoint.from_directory(own) if facts["is_chief"] else None
            ray.train.report({**(logs or {}), **facts, "epoch": epoch + 1}, checkpoint=checkpoint)

    model.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(64), epochs=config["epochs"],
        verbose=0, callbacks=[
            disttrain.callbacks.ModelCheckpoint(os.path.join(own, "epoch{epoch}.keras")),
            ReportToRay(),
        ])
