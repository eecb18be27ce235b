"""A user's training script as Slurm's `srun` or Open MPI's `mpirun` starts it, N copies at once.

Usage: engine_train.py OUT_DIR

Trains a small model for 2 epochs under `disttrain.strategy()` with
`disttrain.callbacks.ModelCheckpoint(OUT_DIR/{run_id}/model.keras)` (the README's path) and
writes `OUT_DIR/task-<pid>.json`: what this process was (replicas in sync, chief, run id, the
Cluster disttrain derived, the Slurm node it ran on) and its final weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The repository root (tests/launch/workers/ is three levels below it), for `disttrain`/`tests`.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main(out_dir: str) -> None:
    import disttrain

    strategy = disttrain.strategy()
    import keras
    import numpy as np

    from disttrain import coordination

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
        disttrain.callbacks.ModelCheckpoint(os.path.join(out_dir, "{run_id}", "model.keras"))])
    coordinator = coordination.get()
    cluster = disttrain.Cluster.from_env()
    with open(os.path.join(out_dir, f"task-{os.getpid()}.json"), "w") as f:
        json.dump({"replicas": strategy.num_replicas_in_sync, "chief": coordinator.is_chief,
                   "rank": coordinator.rank, "run_id": coordinator.run_id(),
                   "cluster": cluster.to_tf_config(),
                   "node": os.environ.get("SLURMD_NODENAME"),
                   "weights": [w.tolist() for w in model.get_weights()]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
