"""Worker function for the preflight tests: each configuration mistake, one fit each."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np

from tests.support.models import dense_model

SAMPLES = 32


class _Stop(Exception):
    """Raised at train begin: the preflight has run, no step is needed."""


SHARED_CACHE = "/nonexistent/disttrain-preflight-cache"


def _dataset(case: str, rank: int):
    import tensorflow as tf

    x = np.arange(SAMPLES * 4, dtype="float32").reshape(SAMPLES, 4)
    pairs = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1)))
    if case.startswith("file"):
        directory = tempfile.mkdtemp(prefix=f"preflight-w{rank}-")
        path = os.path.join(directory, "only.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for row in x:
                writer.write(row.tobytes())
        data = (tf.data.Dataset.from_tensor_slices([path]).interleave(tf.data.TFRecordDataset)
                .map(lambda r: tf.io.decode_raw(r, tf.float32))
                .map(lambda v: (v, tf.reduce_sum(v))).batch(4))
        if case == "file_explicit":
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.FILE)
            data = data.with_options(options)
        return data
    if case == "data_fallback":
        return pairs.map(lambda a, b: (a * 2, b)).batch(4)
    if case == "shared_cache":  # refused before anything is written there
        return pairs.cache(SHARED_CACHE).batch(4)
    return pairs.batch({"indivisible": 3, "too_small": 1}.get(case, 4))


def cases(names: list[str]) -> dict:
    """Runs `fit` once per case (stopped at train begin); per case the `PreflightError`
    message or None, and the `PreflightWarning` messages this worker saw."""
    import keras

    import disttrain
    from disttrain import coordination
    from disttrain.errors import PreflightError, PreflightWarning

    strategy = disttrain.strategy()
    rank = coordination.get().rank
    stop = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: _raise())
    fit_args = {"steps_too_many": {"steps_per_epoch": 100},
                "runs_out": {"steps_per_epoch": 5, "epochs": 3}}
    results = {}
    for case in names:
        keras.config.set_dtype_policy(
            "mixed_bfloat16" if case == "dtype" and rank == 1 else "float32")
        with strategy.scope():
            model = dense_model(4)
            model.compile(optimizer="sgd", loss="mse")
        keras.config.set_dtype_policy("float32")
        error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.fit(_dataset(case, rank), verbose=0, callbacks=[stop],
                          **{"epochs": 1, **fit_args.get(case, {})})
            except PreflightError as e:
                error = str(e)
            except _Stop:
                pass
        results[case] = {"error": error, "warnings": [
            str(w.message) for w in caught if issubclass(w.category, PreflightWarning)]}
    results["outside_scope"] = _fit_outside_scope(_dataset("indivisible", rank))
    if rank == 0:
        results["chief_only_evaluate"] = _chief_only_evaluate(model, _dataset("indivisible", 0))
    return results


def _fit_outside_scope(dataset) -> dict:
    """`fit` of a model built outside any strategy's scope (refused: each worker would train
    alone), then of one built in a `OneDeviceStrategy`'s scope (a model meant for this worker
    alone: trains)."""
    import tensorflow as tf

    from disttrain.errors import PreflightError

    result = {"error": None}
    model = dense_model(4)
    model.compile(optimizer="sgd", loss="mse")
    try:
        model.fit(dataset, epochs=1, verbose=0)
    except PreflightError as e:
        result["error"] = str(e)
    result["trained_before_error"] = int(model.optimizer.iterations.numpy())
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        local = dense_model(4)
        local.compile(optimizer="sgd", loss="mse")
    local.fit(dataset, epochs=1, verbose=0)
    result["local_steps"] = int(local.optimizer.iterations.numpy())
    return result


def _chief_only_evaluate(model, dataset) -> dict:
    """The chief alone evaluates, as under `if cluster.is_chief:` (the other worker has
    returned): first a copy of the model built outside the strategy's scope (works), then
    the model itself (a collective call the other worker never makes)."""
    import keras

    from disttrain.errors import CoordinationError

    local = keras.models.clone_model(model)
    local.set_weights(model.get_weights())
    local.compile(loss="mse")
    result = {"copy": local.evaluate(dataset, verbose=0), "error": None}
    try:
        model.evaluate(dataset, verbose=0)
    except CoordinationError as e:
        result["error"] = str(e)
    return result


def _raise() -> None:
    raise _Stop()
