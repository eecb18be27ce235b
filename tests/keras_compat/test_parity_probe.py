"""`parity_probe.attach` adds its capturing callback however a script passes `callbacks`
(one process, no cluster; `python -m disttrain.check parity` runs it for real)."""

from __future__ import annotations

import pytest

from disttrain.keras_compat import parity_probe


@pytest.mark.parametrize("given", ["none", "list", "tuple", "one", "callback_list"])
def test_the_capturing_callback_is_added_last_to_any_form_of_callbacks(given, tmp_path,
                                                                       monkeypatch):
    import keras

    monkeypatch.setenv(parity_probe.ENV_DIR, str(tmp_path))
    mine = keras.callbacks.History()
    callbacks = {"none": None, "list": [mine], "tuple": (mine,), "one": mine,
                 "callback_list": keras.callbacks.CallbackList([mine])}[given]
    arguments = {"callbacks": callbacks}
    parity_probe.attach(object(), "fit", arguments)
    result = arguments["callbacks"]
    added = result.callbacks if given == "callback_list" else result
    assert result is callbacks or given != "callback_list"
    assert added[:-1] == ([] if given == "none" else [mine])
    assert type(added[-1]).__name__ == "CaptureWeights"


def test_nothing_is_added_outside_a_parity_run_or_to_evaluate(tmp_path, monkeypatch):
    monkeypatch.delenv(parity_probe.ENV_DIR, raising=False)
    arguments = {"callbacks": None}
    parity_probe.attach(object(), "fit", arguments)
    monkeypatch.setenv(parity_probe.ENV_DIR, str(tmp_path))
    parity_probe.attach(object(), "evaluate", arguments)
    assert arguments == {"callbacks": None}
