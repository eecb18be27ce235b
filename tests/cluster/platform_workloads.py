"""Worker function for the platform TF_CONFIG shapes (tests/cluster/test_platforms.py)."""

from __future__ import annotations

import os


def train_with_checkpoint(directory: str) -> dict:
    """Two epochs with ModelCheckpoint into `directory/<task label>`; the evaluator task
    reports its strategy and leaves."""
    import keras
    import numpy as np
    import tensorflow as tf

    import disttrain
    from disttrain import coordination
    from disttrain.cluster import Cluster

    cluster = Cluster.from_env()
    strategy = disttrain.strategy()
    if cluster.is_evaluator:
        return {"label": cluster.label, "strategy": type(strategy).__name__,
                "replicas": strategy.num_replicas_in_sync}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse")
    # Each task checkpoints into a directory named after itself: only the chief's may fill.
    own = os.path.join(directory, cluster.label)
    history = model.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=2, verbose=0,
        callbacks=[disttrain.callbacks.ModelCheckpoint(os.path.join(own, "model.keras"))])
    return {"label": cluster.label, "is_chief": coordination.get().is_chief,
            "rank": cluster.worker_rank, "replicas": strategy.num_replicas_in_sync,
            "loss": history.history["loss"],
            "wrote": sorted(os.listdir(own)) if os.path.isdir(own) else []}
