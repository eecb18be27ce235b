"""How disttrain's callbacks read the monitored metric (one process; no cluster needed)."""

from __future__ import annotations

import numpy as np
import pytest

from disttrain.errors import CallbackConfigError
from tests.support.models import dense_model


def _callbacks():
    import disttrain.callbacks as cb

    return [cb.EarlyStopping(monitor="f1", mode="max", patience=0),
            cb.ReduceLROnPlateau(monitor="f1", mode="max", patience=0)]


@pytest.mark.parametrize("index", [0, 1], ids=["EarlyStopping", "ReduceLROnPlateau"])
def test_a_metric_logged_as_a_one_value_array_is_monitored_like_keras(index):
    import keras

    model = dense_model(2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    callback = _callbacks()[index]
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, {"f1": np.array([0.5], dtype="float32")})
    callback.on_epoch_end(1, {"f1": np.array([0.4], dtype="float32")})
    assert callback.best == pytest.approx(0.5)
    if index == 0:
        assert model.stop_training
    else:
        assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_a_metric_with_several_values_is_refused_with_its_shape():
    model = dense_model(2)
    model.compile(optimizer="sgd", loss="mse")
    callback = _callbacks()[0]
    callback.set_model(model)
    callback.on_train_begin()
    with pytest.raises(CallbackConfigError, match=r"holds 3 values \(shape \(3,\)\).*average='macro'"):
        callback.on_epoch_end(0, {"f1": np.array([0.5, 0.2, 0.1])})
