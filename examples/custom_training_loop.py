"""A custom training loop (tf.GradientTape around `strategy.run`) driving disttrain's callbacks.

The recipe of `docs/custom_loops.md`: the loop calls the callbacks through
`keras.callbacks.CallbackList`, as with stock Keras, and reduces its losses and
metrics across workers before handing them to the callbacks, so every worker
logs the same values and the callbacks decide from all the data.

Run it on two local workers:

```
python -m launch.local --workers 2 -- python examples/custom_training_loop.py --epochs 20
```
"""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import disttrain
from disttrain import callbacks as dcb
from disttrain import coordination

GLOBAL_BATCH = 32


def make_data(seed: int = 0) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """A small binary task; the same arrays on every worker, sharded by the strategy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 6)).astype("float32")
    y = (x[:, 0] - x[:, 1] > 0).astype("float32")[:, None]
    train = tf.data.Dataset.from_tensor_slices((x[:384], y[:384])).batch(GLOBAL_BATCH)
    val = tf.data.Dataset.from_tensor_slices((x[384:], y[384:])).batch(GLOBAL_BATCH)
    return train, val


def train(checkpoint_dir: str, epochs: int = 20, patience: int = 3) -> dict:
    """Trains with a GradientTape loop; returns the history and the best checkpoint.

    Args:
        checkpoint_dir: where the chief writes `best.keras` (and its manifest).
        epochs: the most epochs to run; EarlyStopping may stop sooner.
        patience: EarlyStopping's patience.

    Returns:
        `{"history": [...per-epoch logs], "best": best_checkpoint() record}`.
    """
    strategy = disttrain.strategy()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1, activation="sigmoid")])
        optimizer = keras.optimizers.SGD(0.1)
        loss_fn = keras.losses.BinaryCrossentropy(reduction=None)
    model.optimizer = optimizer
    train_ds, val_ds = make_data()
    train_dist = strategy.experimental_distribute_dataset(train_ds)
    val_dist = strategy.experimental_distribute_dataset(val_ds)

    @tf.function
    def train_step(x, y):
        def step(x, y):
            with tf.GradientTape() as tape:
                per_example = loss_fn(y, model(x, training=True))
                # Divide by the GLOBAL batch: the gradient all-reduce sums the replicas'.
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)

        total, count = strategy.run(step, args=(x, y))
        return (strategy.reduce("SUM", total, axis=None),
                strategy.reduce("SUM", count, axis=None))

    @tf.function
    def val_step(x, y):
        def step(x, y):
            per_example = loss_fn(y, model(x, training=False))
            return tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)

        total, count = strategy.run(step, args=(x, y))
        return (strategy.reduce("SUM", total, axis=None),
                strategy.reduce("SUM", count, axis=None))

    checkpoint = dcb.ModelCheckpoint(os.path.join(checkpoint_dir, "best.keras"),
                                     save_best_only=True)
    callback_list = keras.callbacks.CallbackList(
        [dcb.EarlyStopping(patience=patience), checkpoint,
         dcb.ReduceLROnPlateau(factor=0.5, patience=1)],
        model=model)
    history = []
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        loss_sum = count = 0.0
        for batch, (x, y) in enumerate(train_dist):
            callback_list.on_train_batch_begin(batch)
            total, n = train_step(x, y)
            loss_sum, count = loss_sum + float(total), count + float(n)
            callback_list.on_train_batch_end(batch, {"loss": loss_sum / count})
        val_sum = val_count = 0.0
        for x, y in val_dist:
            total, n = val_step(x, y)
            val_sum, val_count = val_sum + float(total), val_count + float(n)
        # Every worker holds the same global means here: the reduce above summed all workers.
        logs = {"loss": loss_sum / count, "val_loss": val_sum / val_count}
        history.append(logs)
        callback_list.on_epoch_end(epoch, logs)
        if getattr(model, "stop_training", False):
            break
    callback_list.on_train_end()
    return {"history": history, "best": checkpoint.best_checkpoint()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    result = train(args.checkpoint_dir, args.epochs)
    if coordination.get().is_chief:
        print(f"{len(result['history'])} epochs; best checkpoint: {result['best']}")


if __name__ == "__main__":
    main()
