"""Functions the benchmark runs on each worker of a real localhost cluster."""

from __future__ import annotations

import statistics
import time

import numpy as np


def vote_latency(rounds: int = 300) -> dict:
    """Median ms of a coordination vote vs a tf.function all-reduce of one flag."""
    import tensorflow as tf

    from disttrain import coordination
    from disttrain.strategy import strategy as make_strategy

    strategy = make_strategy()
    coord = coordination.get()

    @tf.function
    def all_reduce(flag):
        def fn(f):
            return tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(f))
        return strategy.run(fn, args=(flag,))

    def timed(call) -> float:
        for _ in range(10):
            call()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)

    kv = timed(lambda: coord.any(False, "bench.vote"))
    collective = timed(lambda: all_reduce(tf.constant(0.0)).numpy())
    return {"vote_ms": kv, "all_reduce_ms": collective}


def batchnorm_step_time(skip_bn_fix: bool, steps: int = 150) -> dict:
    """Seconds per training step of a BatchNormalization model, with or without fix (c)."""
    import keras
    import tensorflow as tf

    from disttrain import keras_compat
    from disttrain.strategy import strategy as make_strategy

    keras_compat.apply(skip=("synced_batchnorm_statistics",) if skip_bn_fix else ())
    strategy = make_strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * steps, 32)).astype("float32")
    y = rng.integers(0, 10, size=(64 * steps,)).astype("int32")
    with strategy.scope():
        layers = [keras.Input((32,))]
        for _ in range(4):
            layers += [keras.layers.Dense(64), keras.layers.BatchNormalization(),
                       keras.layers.Activation("relu")]
        model = keras.Sequential(layers + [keras.layers.Dense(10, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    model.fit(ds.take(10), epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return {"step_ms": (time.perf_counter() - start) / steps * 1000}


def checkpoint_save_time(directory: str, rounds: int = 5) -> dict:
    """Seconds per save: disttrain's chief-only atomic ModelCheckpoint vs Keras's."""
    import keras

    from disttrain import callbacks
    from disttrain.strategy import strategy as make_strategy

    strategy = make_strategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(2048),
                                  keras.layers.Dense(2048), keras.layers.Dense(10)])
        model.compile("adam", "mse")
    results = {}
    for name, module in (("disttrain", callbacks), ("keras", keras.callbacks)):
        cb = module.ModelCheckpoint(f"{directory}/{name}/m-{{epoch}}.keras")
        cb.set_model(model)
        cb.on_train_begin()
        samples = []
        for epoch in range(rounds):
            start = time.perf_counter()
            cb.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0})
            samples.append(time.perf_counter() - start)
        results[f"{name}_save_ms"] = statistics.median(samples) * 1000
    return results
