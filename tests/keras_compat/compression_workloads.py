"""Worker functions for tests/keras_compat/test_gradient_compression.py (run by disttrain.testing)."""

from __future__ import annotations

from tests.support.models import dense_model


def _tf_functions(obj, seen: set[int]) -> list:
    """The tf.functions behind `obj`, found through closures and `__wrapped__`."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if hasattr(obj, "_list_all_concrete_functions_for_serialization"):
        return [obj]
    found = []
    for cell in getattr(obj, "__closure__", None) or ():
        found += _tf_functions(cell.cell_contents, seen)
    if hasattr(obj, "__wrapped__"):
        found += _tf_functions(obj.__wrapped__, seen)
    return found


def train(compression: str) -> dict:
    """Fits a small regression for 3 epochs; returns the losses, a hash of the weights
    and the dtypes of the collective all-reduces in the traced train step."""
    import hashlib

    import keras
    import numpy as np
    import tensorflow as tf

    import disttrain

    strategy = disttrain.strategy(gradient_compression=compression)
    with strategy.scope():
        model = dense_model(8, [32], activation="relu", seed=1)
        model.compile(keras.optimizers.SGD(0.05), "mse")
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).batch(32)
    losses = model.fit(dataset, epochs=3, verbose=0).history["loss"]
    dtypes = sorted({op.get_attr("T").name
                     for function in _tf_functions(model.train_function, set())
                     for concrete in function._list_all_concrete_functions_for_serialization()
                     for op in concrete.graph.get_operations()
                     if op.type == "CollectiveReduceV2"})
    weights = np.concatenate([v.numpy().ravel() for v in model.weights])
    return {"loss": losses, "weights": hashlib.sha256(weights.tobytes()).hexdigest(),
            "all_reduce_dtypes": dtypes}
