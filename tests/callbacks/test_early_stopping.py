"""EarlyStopping: Keras parity in one process; agreement and identical restored weights on a
real cluster."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.callbacks import checkpoint_workloads
from tests.callbacks.checkpoint_workloads import results_without_errors

keras = pytest.importorskip("keras")

from disttrain import callbacks  # noqa: E402
from disttrain.errors import CallbackConfigError  # noqa: E402
from tests.support.scripted import drive, tiny_data, tiny_model


@pytest.mark.parametrize(
    "kwargs, values",
    [
        ({"patience": 2}, [1.0, 0.9, 0.95, 0.96, 0.97, 0.5]),
        ({"patience": 0}, [1.0, 0.9, 0.95, 0.8]),
        ({"patience": 1, "min_delta": 0.2}, [1.0, 0.9, 0.85, 0.5, 0.45, 0.44]),
        ({"patience": 1, "baseline": 0.5}, [1.0, 0.9, 0.8, 0.7]),
        ({"patience": 1, "start_from_epoch": 3}, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ({"patience": 1, "mode": "max"}, [0.1, 0.2, 0.15, 0.14, 0.3]),
        ({"patience": 3}, [1.0, 0.9, 0.8, 0.7]),
    ],
)
def test_early_stopping_stops_where_keras_stops(kwargs, values):
    ours = callbacks.EarlyStopping(restore_best_weights=False, **kwargs)
    theirs = keras.callbacks.EarlyStopping(restore_best_weights=False, **kwargs)
    assert drive(ours, values) == drive(theirs, values)
    assert ours.stopped_epoch == theirs.stopped_epoch
    assert ours.best == theirs.best and ours.wait == theirs.wait


def test_early_stopping_mode_inference_for_accuracy():
    model = tiny_model()
    model.compile("sgd", "mse", metrics=["accuracy"])
    model.fit(*tiny_data(8), epochs=1, verbose=0)
    ours = callbacks.EarlyStopping(monitor="val_accuracy", patience=0, restore_best_weights=False)
    assert drive(ours, [0.5, 0.6, 0.55], key="val_accuracy", model=model) == 2


def test_early_stopping_restores_best_weights_by_default_without_stopping():
    x, y = tiny_data()
    model = tiny_model()
    stop = callbacks.EarlyStopping(monitor="loss", patience=50)
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append((logs["loss"], [w.copy() for w in self.model.get_weights()]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, epochs=4, verbose=0, callbacks=[Snapshot(), stop])
    best_loss, best_weights = min(snapshots, key=lambda s: s[0])
    assert stop.stopped_epoch == 0, "should not have stopped"
    for got, want in zip(model.get_weights(), best_weights):
        np.testing.assert_array_equal(got, want)
    assert stop.best == pytest.approx(best_loss)


def test_early_stopping_missing_metric_is_an_error_listing_available_metrics():
    x, y = tiny_data()
    model = tiny_model()
    with pytest.raises(CallbackConfigError) as info:
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.EarlyStopping()])
    message = str(info.value)
    assert "'val_loss' is not in the logs" in message
    assert "Available: loss, mae" in message and "validation_data" in message


def test_early_stopping_strict_false_keeps_keras_warning():
    x, y = tiny_data()
    with pytest.warns(UserWarning, match="val_loss"):
        tiny_model().fit(x, y, epochs=1, verbose=0,
                          callbacks=[callbacks.EarlyStopping(strict=False)])


def test_early_stopping_warns_once_on_training_metric_with_validation_present():
    stop = callbacks.EarlyStopping(monitor="loss", patience=5)
    with pytest.warns(UserWarning, match="monitor='val_loss'") as record:
        drive(stop, [1.0, 0.9, 0.8])
    assert sum("val_loss" in str(w.message) for w in record) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_early_stopping_agrees_and_restores_identical_weights(tmp_path):
    run = run_cluster(
        checkpoint_workloads.checkpoint_job, 2,
        kwargs={"filepath": str(tmp_path / "m-{epoch}.keras"), "epochs": 10,
                "early_stopping_patience": 1, "save_best_only": True},
        timeout=180,
    )
    results = results_without_errors(run)
    assert results[0]["epochs_run"] == results[1]["epochs_run"] == 2
    assert results[0]["weights"] == results[1]["weights"]
