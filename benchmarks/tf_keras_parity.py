"""Stock tf_keras (Keras 2) under MultiWorkerMirroredStrategy against one process, for the
parity matrix's cases where Keras 3 was wrong: does the peer get them right?

Run: `python -m benchmarks.tf_keras_parity` (needs the `bench` extra's tf_keras). One
2-worker cluster on 127.0.0.1 with `TF_USE_LEGACY_KERAS=1` trains each case on the
workers, then the same case in one process (the default strategy, same process, same
seed and global batches), and prints per case the largest difference relative to the
weights (max |w_N - w_1| / max(1, |w_1|)) and whether the workers are bit-identical.
Equal: under 1e-4 (float32; 2e-3 with a 16-bit policy), as in docs/parity.md.

A control case whose difference is known proves the comparison can show one:
BatchNormalization without synchronization normalizes each replica's half of the batch
with that half's statistics (by design, in every data-parallel framework), so it must be
reported as differing; the script exits with status 1 if a control is reported equal.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

CONTROL = "control: BatchNormalization, not synchronized"
"""Must differ: each replica normalizes with its own half of the batch."""
CASES = ("clipnorm (SGD)", "global_clipnorm (Adam)", "clipvalue (SGD)",
         "sparse Adam (Embedding)", "loss scaling (mixed_float16)",
         "NumPy shuffle=True, seeded, 3 epochs", CONTROL)


def _case(keras, name: str, scope) -> list[np.ndarray]:
    """Trains case `name` inside `scope`; returns the weights."""
    import contextlib

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(0)
    sixteen = name.startswith("loss scaling")
    keras.mixed_precision.set_global_policy("mixed_float16" if sixteen else "float32")
    with scope or contextlib.nullcontext():
        if name.startswith("sparse"):
            x = rng.integers(0, 40, size=(64, 6))
            y = rng.normal(size=(64, 1)).astype("float32")
            model = keras.Sequential([keras.layers.Embedding(40, 4, input_length=6),
                                      keras.layers.GlobalAveragePooling1D(),
                                      keras.layers.Dense(1)])
            optimizer = keras.optimizers.Adam(0.01)
        else:
            x = rng.normal(size=(64, 5)).astype("float32")
            y = (x @ rng.normal(size=(5, 1)) * 5).astype("float32")
            normalized = [keras.layers.BatchNormalization()] if name == CONTROL else []
            model = keras.Sequential([keras.layers.Dense(8, input_shape=(5,)), *normalized,
                                      keras.layers.Activation("tanh"),
                                      keras.layers.Dense(1, dtype="float32")])
            optimizer = {"clipnorm (SGD)": lambda: keras.optimizers.SGD(0.05, clipnorm=0.5),
                         "global_clipnorm (Adam)":
                             lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.5),
                         "clipvalue (SGD)": lambda: keras.optimizers.SGD(0.05, clipvalue=0.2),
                         }.get(name, lambda: keras.optimizers.SGD(0.05))()
        model.compile(optimizer, "mse")
    shuffled = name.startswith("NumPy")
    model.fit(x, y, batch_size=16, epochs=3 if shuffled else 1, shuffle=shuffled, verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    return [np.asarray(w, dtype="float64") for w in model.get_weights()]


def worker() -> dict[str, Any]:
    """Every case on this cluster's MWMS, then in one process; the relative differences."""
    import tensorflow as tf
    import tf_keras as keras

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    result = {}
    for name in CASES:
        workers = _case(keras, name, strategy.scope())
        one = _case(keras, name, None)
        result[name] = {
            "difference": max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
                              for a, b in zip(workers, one)),
            "weights": [w.tolist() for w in workers]}
    return result


def main() -> int:
    from benchmarks import tf_keras_parity  # the workers import it by its module name
    from disttrain.testing import run_cluster

    run = run_cluster(tf_keras_parity.worker, 2, env={"TF_USE_LEGACY_KERAS": "1", "TF_DETERMINISTIC_OPS": "1"},
                      timeout=400).assert_ok()
    first, second = run.results
    print("| case | stock tf_keras, 2 workers vs one process | workers identical |")
    print("| --- | --- | --- |")
    blind = False
    for name in CASES:
        bound = 2e-3 if name.startswith("loss scaling") else 1e-4
        difference = first[name]["difference"]
        verdict = "equal" if difference < bound else "DIFFERS"
        blind |= name == CONTROL and verdict == "equal"
        print(f"| {name} | {verdict} ({difference:.1e}) | "
              f"{first[name]['weights'] == second[name]['weights']} |")
    if blind:
        print(f"the control case ({CONTROL}) was reported equal: this comparison cannot "
              "show a difference, so its 'equal' rows prove nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
