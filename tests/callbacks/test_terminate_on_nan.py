"""TerminateOnNaN: Keras parity in one process; every worker stopping after the same batch on
a real cluster.

The multi-worker tests share one real 2-worker cluster (the `callbacks_cluster` fixture
in tests/callbacks/conftest.py, running tests/callbacks/shared_cluster_workloads.py).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from disttrain.callbacks.terminate_on_nan import TerminateOnNaN
from tests.support.models import (
    INPUT_DIM,
    dense_model,
    parity_fit,
    parity_model,
)


def _exploding_model():
    model = keras.Sequential(
        [keras.Input((INPUT_DIM,))]
        + [
            keras.layers.Dense(2, activation="relu",
                               kernel_initializer=keras.initializers.Constant(1e5))
            for _ in range(5)
        ]
        + [keras.layers.Dense(2)]
    )
    model.compile(loss="mean_squared_error", optimizer="sgd")
    return model


@pytest.mark.parametrize("cls", [TerminateOnNaN, keras.callbacks.TerminateOnNaN])
def test_terminate_on_nan_stops_like_keras(cls):
    history = parity_fit(_exploding_model(), [cls()], epochs=20)
    loss = history.history["loss"]
    assert len(loss) == 1
    assert np.isnan(loss[0]) or np.isinf(loss[0])


def test_terminate_on_nan_stops_after_the_same_batch_as_keras():
    batches = {}
    for cls in (TerminateOnNaN, keras.callbacks.TerminateOnNaN):
        seen = []
        recorder = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: seen.append(batch)
        )
        x = np.array([[1.0], [2.0], [3.0], [4.0]])
        y = np.array([[1.0], [2.0], [np.inf], [4.0]])
        model = dense_model(1)
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, epochs=2, batch_size=1, shuffle=False, callbacks=[cls(), recorder],
                  verbose=0)
        batches[cls] = seen
    assert batches[TerminateOnNaN] == batches[keras.callbacks.TerminateOnNaN] == [0, 1, 2]


def test_terminate_on_nan_raise_error_like_keras():
    model = dense_model(1)
    model.compile(optimizer="sgd", loss="mse")
    x = np.array([[1.0], [2.0]])
    y = np.array([[np.inf], [np.inf]])
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 0"):
        model.fit(x, y, epochs=2, batch_size=1, callbacks=[TerminateOnNaN(raise_error=True)],
                  verbose=0)


def test_terminate_on_nan_ignores_finite_and_missing_loss():
    callback = TerminateOnNaN(raise_error=True)
    callback.set_model(parity_model())
    callback.on_batch_end(0, {"loss": 0.5})
    callback.on_batch_end(1, {})
    callback.on_batch_end(2, None)
    assert not callback.model.stop_training





@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "scenario", ["nan_in_data", "nan_on_worker_1_only", "nan_on_worker_1_only_raise"]
)
def test_multi_worker_terminate_on_nan_stops_all_after_the_same_batch(callbacks_cluster, scenario):
    _, (chief, other) = callbacks_cluster
    a, b = chief["terminate_on_nan"][scenario], other["terminate_on_nan"][scenario]
    assert a["batches"] == b["batches"]
    assert len(a["batches"]) < 16, "training did not stop early"
    if scenario == "nan_on_worker_1_only":
        assert a["batches"] == [0, 1, 2, 3], "worker 1's NaN is in its batch 3"
    if scenario.endswith("_raise"):
        assert a["error"] == b["error"]
        assert a["error"].startswith("RuntimeError: NaN or Inf loss encountered at batch 3")
    else:
        assert a["error"] is b["error"] is None
        assert a["epochs"] == b["epochs"] == 1
        assert a["stop_training"] and b["stop_training"]



@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_terminate_on_nan_finite_loss_trains_fully(callbacks_cluster):
    _, (chief, other) = callbacks_cluster
    for result in (chief, other):
        clean = result["terminate_on_nan"]["no_nan"]
        assert clean["batches"] == list(range(8)) * 2
        assert clean["epochs"] == 2 and clean["last_loss_finite"]
        assert clean["exchanges"] < 8, (
            f"{clean['exchanges']} coordination exchanges in 16 batches: the loss is "
            "all-reduced already, TerminateOnNaN must not vote per batch")
