"""ReduceLROnPlateau: Keras parity in one process, the chief's LR on every worker of a real cluster.

The multi-worker tests share one real 2-worker cluster (the `callbacks_cluster` fixture
in tests/callbacks/conftest.py, running tests/callbacks/shared_cluster_workloads.py).
"""

from __future__ import annotations

import keras
import pytest

from disttrain.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from disttrain.errors import CallbackConfigError
from tests.support.models import (
    learning_rate_of,
    parity_fit,
    parity_model,
)

SCRIPTED_VAL_LOSS = [1.0, 0.9, 0.95, 0.9, 0.89995, 0.8, 0.81, 0.82, 0.83, 0.7, 0.71, 0.72]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": 1},
        {"patience": 2, "factor": 0.5},
        {"patience": 1, "cooldown": 2},
        {"patience": 0, "min_delta": 0.05},
        {"patience": 1, "min_lr": 0.004},
        {"patience": 1, "mode": "max"},
        {"patience": 2, "mode": "max", "monitor": "val_auc"},
    ],
)
def test_reduce_lr_reduces_at_the_same_epochs_as_keras(kwargs):
    monitor = kwargs.get("monitor", "val_loss")
    ours = ReduceLROnPlateau(**kwargs)
    theirs = keras.callbacks.ReduceLROnPlateau(**kwargs)
    rates = {}
    for name, callback in (("ours", ours), ("keras", theirs)):
        model = parity_model(keras.optimizers.SGD(0.1))
        callback.set_model(model)
        callback.on_train_begin()
        rates[name] = []
        for epoch, value in enumerate(SCRIPTED_VAL_LOSS):
            callback.on_epoch_end(epoch, {monitor: value, "loss": 1.0})
            rates[name].append(learning_rate_of(model))
    assert rates["ours"] == rates["keras"]
    assert len(set(rates["ours"])) > 1, "the scripted sequence never triggered a reduction"


def test_reduce_lr_with_model_fit():
    model = parity_model()
    parity_fit(model, [ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss",
                                         min_delta=100)])
    assert learning_rate_of(model) == pytest.approx(0.01)


def test_reduce_lr_adds_learning_rate_to_logs_like_keras():
    histories = [
        parity_fit(parity_model(), [cls(patience=1, monitor="val_loss", min_delta=100)],
                   epochs=3).history
        for cls in (ReduceLROnPlateau, keras.callbacks.ReduceLROnPlateau)
    ]
    assert histories[0] == histories[1]
    assert histories[0]["learning_rate"] == pytest.approx([0.1, 0.1, 0.01])


def test_reduce_lr_verbose_message_like_keras(capsys):
    parity_fit(parity_model(), [ReduceLROnPlateau(patience=1, monitor="val_loss", min_delta=100,
                                      verbose=1)])
    assert "ReduceLROnPlateau reducing learning rate to 0.01" in capsys.readouterr().out


def test_reduce_lr_raises_like_keras_when_optimizer_has_schedule():
    schedule = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10
    )
    model = parity_model(keras.optimizers.Adam(schedule))
    with pytest.raises(TypeError, match="This optimizer was created with a `LearningRateSchedule`"):
        parity_fit(model, [ReduceLROnPlateau(patience=1, monitor="val_loss", min_delta=100)])


def test_reduce_lr_schedule_without_reduction_trains():
    schedule = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10
    )
    model = parity_model(keras.optimizers.Adam(schedule))
    history = parity_fit(model, [ReduceLROnPlateau(patience=5, monitor="val_loss")])
    assert len(history.history["loss"]) == 2


def test_reduce_lr_missing_monitor_is_a_clear_error():
    callback = ReduceLROnPlateau(monitor="val_acuracy", patience=1)
    with pytest.raises(CallbackConfigError) as info:
        parity_fit(parity_model(metrics=["mae"]), [callback])
    message = str(info.value)
    assert "'val_acuracy' is not in the logs" in message
    assert "val_mae" in message and "strict=False" in message


def test_reduce_lr_missing_monitor_without_validation_hints_at_validation_data():
    with pytest.raises(CallbackConfigError, match="pass validation_data"):
        parity_fit(parity_model(), [ReduceLROnPlateau(patience=1)], validation=False)


def test_reduce_lr_not_strict_keeps_keras_warning():
    model = parity_model()
    with pytest.warns(UserWarning, match="conditioned on metric `val_acuracy`"):
        parity_fit(model, [ReduceLROnPlateau(monitor="val_acuracy", mode="min", patience=1,
                                       strict=False)])
    assert learning_rate_of(model) == pytest.approx(0.1)


def test_reduce_lr_keeps_keras_argument_checks():
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.5)





@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_lr_is_the_chiefs_on_every_worker(callbacks_cluster):
    _, (chief, other) = callbacks_cluster
    assert chief["reduce_lr"]["rates"] == pytest.approx([0.1, 0.01, 0.001])
    assert other["reduce_lr"]["rates"] == chief["reduce_lr"]["rates"]
    assert other["reduce_lr"]["weights"] == chief["reduce_lr"]["weights"]
