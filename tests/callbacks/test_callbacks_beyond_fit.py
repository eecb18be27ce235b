"""Callbacks beyond `fit`'s happy path (issue 29): custom training loops driving
`CallbackList`, several ModelCheckpoints in one directory, chief-only callbacks
(`on_chief`), multi-metric EarlyStopping. The multi-worker cases run on the shared
2-worker cluster of `callbacks_cluster` (tests/callbacks/conftest.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess

import numpy as np
import pytest

from disttrain.testing import function_command, worker_env
from tests.callbacks import callback_loop_workloads as workloads
from tests.support.processes import run_until_killed

keras = pytest.importorskip("keras")

from disttrain import callbacks  # noqa: E402
from disttrain.errors import CallbackConfigError, ChiefOnlyError  # noqa: E402
from tests.support.scripted import drive, tiny_data, tiny_model  # noqa: E402


def _custom_loop(model, callback_list, values, key="val_loss"):
    """A loop driving `callback_list` by hand, as Keras's guides show; never sets
    `model.stop_training`. Returns the number of epochs run."""
    x, y = tiny_data(16)
    callback_list.on_train_begin()
    epochs = 0
    for epoch, value in enumerate(values):
        callback_list.on_epoch_begin(epoch)
        model.train_on_batch(x, y)
        callback_list.on_epoch_end(epoch, {"loss": value, key: value})
        epochs += 1
        if getattr(model, "stop_training", False):
            break
    callback_list.on_train_end()
    return epochs


@pytest.mark.parametrize("ours", [False, True])
def test_custom_loop_with_callback_list_runs_as_with_keras(tmp_path, ours):
    """The old code raised AttributeError ('Sequential' object has no attribute
    'stop_training') from EarlyStopping at the first epoch end."""
    module = callbacks if ours else keras.callbacks
    model = tiny_model()
    stop = module.EarlyStopping(patience=1, restore_best_weights=True)
    checkpoint = module.ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True)
    callback_list = keras.callbacks.CallbackList(
        [stop, checkpoint, module.ReduceLROnPlateau(patience=1)], model=model)
    assert _custom_loop(model, callback_list, [1.0, 0.8, 0.9, 0.95, 0.5]) == 3
    assert stop.stopped_epoch == 2 and stop.best_epoch == 1
    assert os.path.exists(tmp_path / "best.keras")


def test_multi_metric_early_stopping_semantics():
    """Stops when no metric improved for `patience` epochs; per-metric mode and min_delta."""
    stop = callbacks.EarlyStopping(monitor=["val_a", "val_b"], mode=["min", "max"],
                                   min_delta=[0.05, 0.0], patience=1,
                                   restore_best_weights=False)
    model = tiny_model()
    stop.set_model(model)
    stop.on_train_begin()
    a = [1.0, 0.9, 0.88, 0.87, 0.86]   # improves by >= 0.05 only at epoch 1
    b = [0.1, 0.1, 0.3, 0.3, 0.3]     # improves only at epoch 2
    for epoch in range(5):
        stop.on_epoch_end(epoch, {"val_a": a[epoch], "val_b": b[epoch]})
        if model.stop_training:
            break
    assert (epoch, stop.stopped_epoch, stop.best_epoch) == (3, 3, 2)
    assert stop.best == [0.9, 0.3]
    for monitor, mode, delta, values in (("val_a", "min", 0.05, a), ("val_b", "max", 0.0, b)):
        single = callbacks.EarlyStopping(monitor=monitor, mode=mode, min_delta=delta,
                                         patience=1, restore_best_weights=False)
        assert drive(single, values, key=monitor) < 3, "either metric alone stops sooner"


@pytest.mark.parametrize("kwargs, match", [
    ({"monitor": []}, "non-empty list"),
    ({"monitor": ["val_a", "val_a"]}, "distinct"),
    ({"monitor": ["val_a", "val_b"], "min_delta": [0.1]}, "1 values for 2 metrics"),
    ({"monitor": "val_loss", "mode": ["min", "max"]}, "needs a list of monitors"),
])
def test_multi_metric_early_stopping_bad_arguments(kwargs, match):
    with pytest.raises(CallbackConfigError, match=match):
        callbacks.EarlyStopping(**kwargs)


def test_multi_metric_auto_mode_that_cannot_be_inferred_names_the_fix():
    stop = callbacks.EarlyStopping(monitor=["val_loss", "val_custom"])
    with pytest.raises(CallbackConfigError, match="mode=\\[...\\]"):
        drive(stop, [1.0], key="val_custom")


def test_on_chief_in_one_process_runs_and_refuses_agreements():
    from disttrain import coordination

    events = []

    class Alert(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            events.append(epoch)

    class Vote(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            coordination.get().any(True, "user vote")

    class Legacy(keras.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            events.append(f"batch {batch}")

    @callbacks.on_chief
    def double(x):
        return 2 * x

    x, y = tiny_data(8)
    model = tiny_model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.on_chief(Alert())])
    assert events == [0, 1] and double(3) == 6
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callbacks.on_chief(Legacy())])
    assert events[2:] == ["batch 0", "batch 1"]
    with pytest.raises(ChiefOnlyError, match="'user vote'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.on_chief(Vote())])
    with pytest.raises(CallbackConfigError, match="without on_chief"):
        callbacks.on_chief(callbacks.EarlyStopping())


def test_best_and_last_each_manifest_tells_the_truth(tmp_path):
    """With the old shared best.json the manifest named last.keras (epoch 4, 0.95) as best."""
    values = [1.0, 0.5, 0.9, 0.95]

    class Script(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = values[epoch]

    best = callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True)
    last = callbacks.ModelCheckpoint(str(tmp_path / "last.keras"))
    tiny_model().fit(*tiny_data(16), epochs=4, verbose=0, callbacks=[Script(), best, last])
    records = {name: json.loads((tmp_path / name).read_text())
               for name in ("best.best.keras.json", "best.last.keras.json")}
    assert [records["best.best.keras.json"][k] for k in ("path", "epoch", "value")] == [
        str(tmp_path / "best.keras"), 2, 0.5]
    assert [records["best.last.keras.json"][k] for k in ("path", "epoch")] == [
        str(tmp_path / "last.keras"), 4]
    assert sorted(os.listdir(tmp_path)) == sorted([*records, "best.keras", "last.keras"])


def test_sidecar_evaluator_follows_the_manifest_it_is_given(tmp_path):
    from disttrain import SidecarEvaluator

    sidecar = SidecarEvaluator(tiny_model(), tiny_data(8), str(tmp_path),
                               manifest="best.last.keras.json")
    assert sidecar.manifest_url == str(tmp_path / "best.last.keras.json")
    assert SidecarEvaluator(tiny_model(), tiny_data(8), str(tmp_path)).manifest_url == str(
        tmp_path / "best.json")


def test_two_checkpoints_with_one_manifest_name_are_refused(tmp_path):
    model = tiny_model()
    stack = [callbacks.ModelCheckpoint(str(tmp_path / "a{epoch}.keras")),
             callbacks.ModelCheckpoint(str(tmp_path / "a_epoch_.keras"))]
    keras.callbacks.CallbackList(stack, model=model)
    with pytest.raises(CallbackConfigError, match="share the commit record"):
        stack[0].on_train_begin()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_callbacks_beyond_fit_on_two_workers(callbacks_cluster):
    """Every case of `callback_loop_workloads.CASES`, run by the shared 2-worker cluster."""
    workdir, shared = callbacks_cluster
    results = [r["beyond_fit"] for r in shared]
    directory = workdir / "beyond_fit"
    chief, other = results
    for name in ("custom_loop", "example", "best_and_last", "alert", "multi_metric"):
        for result in results:
            assert "error" not in result[name], result[name].get("traceback")

    # A custom loop with per-worker logs: the chief's best epoch (index 1) and stop (after
    # epoch 4) everywhere, identical weights, the same best checkpoint, written once.
    loop = [r["custom_loop"] for r in results]
    assert [r["epochs_run"] for r in loop] == [4, 4]
    assert [r["restored_epoch"] for r in loop] == [1, 1]
    assert loop[0]["weights"] == loop[1]["weights"]
    assert loop[0]["best"] == loop[1]["best"]
    assert os.path.basename(loop[0]["best"]["path"]) == "m-2-0.80.keras"
    assert loop[0]["listing"] == ["best.json", "m-1-1.00.keras", "m-2-0.80.keras"]
    assert loop[0]["learning_rate"] == loop[1]["learning_rate"]

    # The documented example: reduced logs, the same history and best checkpoint everywhere.
    assert chief["example"]["history"] == other["example"]["history"]
    assert chief["example"]["best"] == other["example"]["best"]
    assert chief["example"]["listing"] == ["best.json", "best.keras"]

    # "best" + "last" + a second monitor in one directory: each manifest tells the truth.
    ckpt = chief["best_and_last"]
    assert ckpt == other["best_and_last"] | {"listing": ckpt["listing"]}
    history, manifests = ckpt["history"], ckpt["manifests"]
    assert sorted(manifests) == ["best.acc-_epoch_.keras.json", "best.best.keras.json",
                                 "best.last.keras.json"]
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    assert manifests["best.best.keras.json"]["epoch"] == best_epoch
    assert manifests["best.best.keras.json"]["value"] == min(history["val_loss"])
    assert manifests["best.last.keras.json"]["epoch"] == len(history["val_loss"])
    assert manifests["best.last.keras.json"]["path"].endswith("last.keras")
    acc = manifests["best.acc-_epoch_.keras.json"]
    assert acc["value"] == max(history["val_accuracy"])
    acc_file = f"acc-{acc['epoch']}.keras"
    assert ckpt["listing"] == sorted([*manifests, "best.keras", "last.keras", acc_file])
    assert [b["path"] for b in ckpt["best"]] == [m["path"] for m in manifests.values()]

    # A chief-only alert: each event once; the decorated function's result on the chief.
    alerts = (directory / "alert" / workloads.ALERT_LOG).read_text().split("\n")
    assert alerts == ["begin", "epoch 1", "nested 1", "epoch 2", "nested 2", "epoch 3",
                      "nested 3", "done", ""]
    assert chief["alert"]["returned"] == "done" and other["alert"]["returned"] is None
    assert [r["alert"]["training_metric_warnings"] for r in results] == [1, 0]

    # Multi-metric EarlyStopping: the chief's stop (after epoch 4) on both workers.
    multi = [r["multi_metric"] for r in results]
    assert [m["epochs_run"] for m in multi] == [4, 4]
    assert [m["best_epoch"] for m in multi] == [2, 2]
    assert multi[0]["weights"] == multi[1]["weights"]
    for m in multi:
        assert m["vector_error"].startswith("CallbackConfigError") and "2 values" in \
            m["vector_error"], m["vector_error"]

    # A collective inside chief-only code: ChiefOnlyError on every worker, at once.
    for result in results:
        for name, call in (("reduce", ".reduce()"), ("evaluate", ".evaluate()"),
                           ("vote", "'user vote'")):
            outcome = result["collective"][name]
            assert outcome["error"].startswith("ChiefOnlyError") and call in outcome["error"]
            assert outcome["seconds"] < 20, outcome


@pytest.mark.timeout(300)
def test_best_and_last_manifests_survive_kills_and_restarts(tmp_path):
    """SIGKILL a process saving "best" and "last" into one directory at random moments and
    restart it (same run, resuming after the epoch the "last" manifest names): after every
    kill each manifest names its own file, which holds the save it records (or the save in
    flight at the kill), and the "best" manifest holds the best value so far. With the old
    shared best.json the "best" record named last.keras."""
    directory = tmp_path / "ckpt"
    rng = random.Random(1)
    command = function_command(workloads.best_and_last_forever, {"directory": str(directory)})
    env = worker_env({"DISTTRAIN_RUN_ID": "crash-loop",
                      "DISTTRAIN_TEST_RESULT": str(tmp_path / "result.json")})

    def held_epoch(path):
        """The epoch whose save `path` holds (every weight equals it)."""
        (epoch,) = {float(v) for w in keras.saving.load_model(path).get_weights()
                    for v in np.ravel(w)}
        return int(epoch)

    def check(attempt):
        best = json.loads((directory / "best.best.keras.json").read_text())
        last = json.loads((directory / "best.last.keras.json").read_text())
        assert last["path"].endswith("last.keras") and best["path"].endswith("best.keras")
        values = [workloads.scripted_val_loss(e) for e in range(last["epoch"] + 1)]
        assert best["value"] in (min(values[:-1]), min(values)), (attempt, best, last)
        assert best["value"] == workloads.scripted_val_loss(best["epoch"] - 1)
        # A file saved again under its name is replaced atomically before its manifest is
        # written: a kill in between leaves the file one save ahead of the manifest (the
        # save in flight), never behind and never torn.
        held = held_epoch(last["path"])
        assert held in (last["epoch"], last["epoch"] + 1), (attempt, held, last)
        held = held_epoch(best["path"])
        assert held == best["epoch"] or (
            held > best["epoch"]
            and workloads.scripted_val_loss(held - 1) < best["value"]), (attempt, held, best)
        return last["epoch"]

    reached = []
    for attempt in range(2):
        err = run_until_killed(command, env, rng.uniform(0.3, 1.0))
        assert "Refusing" not in err, err[-2000:]
        reached.append(check(attempt))
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    assert check("final") == 150 and reached == sorted(reached), reached
    assert sorted(os.listdir(directory)) == ["best.best.keras.json", "best.keras",
                                             "best.last.keras.json", "last.keras"]
