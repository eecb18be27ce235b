"""ReduceLROnPlateau, TerminateOnNaN, CSVLogger and TensorBoard: Keras parity and multi-worker.

Single-process tests check that each callback behaves like its `keras.callbacks`
namesake for the same arguments (in the style of Keras's own tests), plus the
documented differences. The slow tests run the workers of
`tests/callback_workloads_misc.py` on one real 2-worker localhost cluster.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import subprocess
import sys

import fsspec
import keras
import numpy as np
import pytest

from disttrain.callbacks.csv_logger import CSVLogger
from disttrain.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from disttrain.callbacks.tensorboard import TensorBoard
from disttrain.callbacks.terminate_on_nan import TerminateOnNaN
from disttrain.errors import CallbackConfigError, StorageError
from disttrain.testing import run_cluster, worker_env
from tests import callback_workloads_misc as workloads
from tests.processes import can_make_read_only_views, read_only_view

TRAIN_SAMPLES = 10
TEST_SAMPLES = 10
INPUT_DIM = 3
BATCH_SIZE = 4


def _data():
    rng = np.random.default_rng(1337)
    x_train = rng.random((TRAIN_SAMPLES, INPUT_DIM)).astype("float32")
    y_train = rng.random((TRAIN_SAMPLES, 2)).astype("float32")
    x_test = rng.random((TEST_SAMPLES, INPUT_DIM)).astype("float32")
    y_test = rng.random((TEST_SAMPLES, 2)).astype("float32")
    return x_train, y_train, x_test, y_test


def _model(optimizer=None, metrics=None):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((INPUT_DIM,)), keras.layers.Dense(5, name="hidden"),
         keras.layers.Dense(2, name="out")],
        name="net",
    )
    model.compile(loss="mse", optimizer=optimizer or keras.optimizers.Adam(0.1),
                  metrics=metrics)
    return model


def _fit(model, callbacks, epochs=2, validation=True, **kwargs):
    x_train, y_train, x_test, y_test = _data()
    return model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0,
        validation_data=(x_test, y_test) if validation else None,
        callbacks=callbacks, **kwargs,
    )


def _lr(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


# ---------------------------------------------------------------- ReduceLROnPlateau

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
        model = _model(keras.optimizers.SGD(0.1))
        callback.set_model(model)
        callback.on_train_begin()
        rates[name] = []
        for epoch, value in enumerate(SCRIPTED_VAL_LOSS):
            callback.on_epoch_end(epoch, {monitor: value, "loss": 1.0})
            rates[name].append(_lr(model))
    assert rates["ours"] == rates["keras"]
    assert len(set(rates["ours"])) > 1, "the scripted sequence never triggered a reduction"


def test_reduce_lr_with_model_fit():
    model = _model()
    _fit(model, [ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss", min_delta=100)])
    assert _lr(model) == pytest.approx(0.01)


def test_reduce_lr_adds_learning_rate_to_logs_like_keras():
    histories = [
        _fit(_model(), [cls(patience=1, monitor="val_loss", min_delta=100)], epochs=3).history
        for cls in (ReduceLROnPlateau, keras.callbacks.ReduceLROnPlateau)
    ]
    assert histories[0] == histories[1]
    assert histories[0]["learning_rate"] == pytest.approx([0.1, 0.1, 0.01])


def test_reduce_lr_verbose_message_like_keras(capsys):
    _fit(_model(), [ReduceLROnPlateau(patience=1, monitor="val_loss", min_delta=100,
                                      verbose=1)])
    assert "ReduceLROnPlateau reducing learning rate to 0.01" in capsys.readouterr().out


def test_reduce_lr_raises_like_keras_when_optimizer_has_schedule():
    schedule = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10
    )
    model = _model(keras.optimizers.Adam(schedule))
    with pytest.raises(TypeError, match="This optimizer was created with a `LearningRateSchedule`"):
        _fit(model, [ReduceLROnPlateau(patience=1, monitor="val_loss", min_delta=100)])


def test_reduce_lr_schedule_without_reduction_trains():
    schedule = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10
    )
    model = _model(keras.optimizers.Adam(schedule))
    history = _fit(model, [ReduceLROnPlateau(patience=5, monitor="val_loss")])
    assert len(history.history["loss"]) == 2


def test_reduce_lr_missing_monitor_is_a_clear_error():
    callback = ReduceLROnPlateau(monitor="val_acuracy", patience=1)
    with pytest.raises(CallbackConfigError) as info:
        _fit(_model(metrics=["mae"]), [callback])
    message = str(info.value)
    assert "'val_acuracy' is not in the logs" in message
    assert "val_mae" in message and "strict=False" in message


def test_reduce_lr_missing_monitor_without_validation_hints_at_validation_data():
    with pytest.raises(CallbackConfigError, match="pass validation_data"):
        _fit(_model(), [ReduceLROnPlateau(patience=1)], validation=False)


def test_reduce_lr_not_strict_keeps_keras_warning():
    model = _model()
    with pytest.warns(UserWarning, match="conditioned on metric `val_acuracy`"):
        _fit(model, [ReduceLROnPlateau(monitor="val_acuracy", mode="min", patience=1,
                                       strict=False)])
    assert _lr(model) == pytest.approx(0.1)


def test_reduce_lr_keeps_keras_argument_checks():
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.5)


# ---------------------------------------------------------------- TerminateOnNaN


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
    history = _fit(_exploding_model(), [cls()], epochs=20)
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
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, epochs=2, batch_size=1, shuffle=False, callbacks=[cls(), recorder],
                  verbose=0)
        batches[cls] = seen
    assert batches[TerminateOnNaN] == batches[keras.callbacks.TerminateOnNaN] == [0, 1, 2]


def test_terminate_on_nan_raise_error_like_keras():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.array([[1.0], [2.0]])
    y = np.array([[np.inf], [np.inf]])
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 0"):
        model.fit(x, y, epochs=2, batch_size=1, callbacks=[TerminateOnNaN(raise_error=True)],
                  verbose=0)


def test_terminate_on_nan_ignores_finite_and_missing_loss():
    callback = TerminateOnNaN(raise_error=True)
    callback.set_model(_model())
    callback.on_batch_end(0, {"loss": 0.5})
    callback.on_batch_end(1, {})
    callback.on_batch_end(2, None)
    assert not callback.model.stop_training


# ---------------------------------------------------------------- CSVLogger


def _read_text(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return f.read().decode("utf-8")


@pytest.mark.parametrize(
    "separator, fit_kwargs",
    [
        (",", {}),
        ("\t", {"validation_freq": 2, "epochs": 3}),
        (";", {"validation": False}),
    ],
)
def test_csv_logger_writes_the_same_file_as_keras(tmp_path, separator, fit_kwargs):
    ours, theirs = tmp_path / "ours.csv", tmp_path / "keras.csv"
    _fit(
        _model(metrics=["mae"]),
        [ReduceLROnPlateau(patience=1, min_delta=100, monitor="loss"),
         CSVLogger(str(ours), separator=separator),
         keras.callbacks.CSVLogger(str(theirs), separator=separator)],
        **fit_kwargs,
    )
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_text().startswith("epoch")


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_csv_logger_append_across_fits_without_duplicate_header(tmp_path, url_kind):
    theirs = tmp_path / "keras.csv"
    ours = str(tmp_path / "ours.csv") if url_kind == "local" else (
        f"memory://{tmp_path.name}/append.csv"
    )
    model = _model()
    for epochs in (2, 3):
        _fit(model, [CSVLogger(ours, append=True),
                     keras.callbacks.CSVLogger(str(theirs), append=True)], epochs=epochs)
    text = _read_text(ours)
    with open(theirs, newline="") as f:
        assert text == f.read()
    assert len(re.findall("epoch", text)) == 1
    assert len(text.splitlines()) == 1 + 2 + 3


def test_csv_logger_reused_object_appends_like_keras(tmp_path):
    ours, theirs = str(tmp_path / "ours.tsv"), str(tmp_path / "keras.tsv")
    model = _model()
    callbacks = [CSVLogger(ours, separator="\t", append=True),
                 keras.callbacks.CSVLogger(theirs, separator="\t", append=True)]
    _fit(model, callbacks, epochs=1)
    _fit(model, callbacks, epochs=2)
    assert _read_text(ours) == _read_text(theirs)
    assert len(_read_text(ours).splitlines()) == 4


def test_csv_logger_without_append_replaces_the_file(tmp_path):
    url = str(tmp_path / "log.csv")
    _fit(_model(), [CSVLogger(url)], epochs=3)
    _fit(_model(), [CSVLogger(url)], epochs=1)
    rows = list(csv.DictReader(io.StringIO(_read_text(url))))
    assert [row["epoch"] for row in rows] == ["0"]


def test_csv_logger_header_mismatch_is_a_clear_error(tmp_path):
    url = str(tmp_path / "log.csv")
    _fit(_model(), [CSVLogger(url)], epochs=1)
    before = _read_text(url)
    with pytest.raises(CallbackConfigError) as info:
        _fit(_model(metrics=["mae"]), [CSVLogger(url, append=True)], epochs=1)
    message = str(info.value)
    assert "has the columns" in message and "'mae'" in message and "append=False" in message
    assert _read_text(url) == before


def test_csv_logger_unwritable_destination_fails_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    epochs = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs.append(epoch))
    with pytest.raises(StorageError, match=r"CSVLogger\.load failed on w0: StorageError: "
                                           r"destination '.*blocker' is not writable"):
        _fit(_model(), [CSVLogger(str(blocker / "log.csv")), counter], epochs=1)
    assert epochs == []


def test_csv_logger_write_failure_during_training_is_a_storage_error(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()

    def replace_directory_with_a_file(epoch, logs):
        directory.rmdir()
        directory.write_text("a file where a directory should be")

    breaker = keras.callbacks.LambdaCallback(on_epoch_end=replace_directory_with_a_file)
    with pytest.raises(StorageError, match=r"CSVLogger\.write failed"):
        _fit(_model(), [breaker, CSVLogger(str(directory / "log.csv"))], epochs=1)


def test_csv_logger_leaves_no_temp_files(tmp_path):
    _fit(_model(), [CSVLogger(str(tmp_path / "log.csv"))], epochs=3)
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]


# ---------------------------------------------------------------- TensorBoard


def _event_files(root) -> list[str]:
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.startswith("events.out.tfevents.")
    )


def _summaries(root) -> set[tuple[str, str]]:
    """(directory relative to `root`, tag) of every summary value under `root`."""
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    found = set()
    for path in _event_files(root):
        relative = os.path.relpath(os.path.dirname(path), root)
        for record in tf_record.tf_record_iterator(path):
            event = event_pb2.Event.FromString(record)
            found.update((relative, value.tag) for value in event.summary.value)
    return found


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"histogram_freq": 1, "write_images": True, "write_steps_per_second": True},
        {"update_freq": "batch", "write_graph": False},
    ],
)
def test_tensorboard_writes_the_same_summaries_as_keras(tmp_path, kwargs):
    for name, cls in (("ours", TensorBoard), ("keras", keras.callbacks.TensorBoard)):
        _fit(_model(), [cls(log_dir=str(tmp_path / name), **kwargs)])
    ours, theirs = _summaries(tmp_path / "ours"), _summaries(tmp_path / "keras")
    assert ours == theirs
    assert {d for d, _ in ours} == {"train", "validation"}


def test_tensorboard_gates_every_keras_hook():
    keras_hooks = {n for n in vars(keras.callbacks.TensorBoard) if n.startswith("on_")}
    ours = {n for n in vars(TensorBoard) if n.startswith("on_")}
    assert keras_hooks <= ours, f"new Keras hooks not gated on non-chief: {keras_hooks - ours}"


def test_tensorboard_rejects_unknown_non_chief_mode():
    with pytest.raises(CallbackConfigError, match="'off'.*'scratch'"):
        TensorBoard(non_chief="everywhere")


def test_tensorboard_log_dir_tensorflow_cannot_write_is_a_storage_error():
    with pytest.raises(StorageError, match="use a writable local path or a gs:// URL"):
        _fit(_model(), [TensorBoard(log_dir="memory://tb")], epochs=1)


TENSORBOARD_ON_A_READ_ONLY_DIRECTORY = """
import sys
import keras
import numpy as np
from disttrain.callbacks.tensorboard import TensorBoard
from disttrain.errors import StorageError
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
begun = []
counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: begun.append(epoch))
try:
    model.fit(np.zeros((8, 2)), np.zeros((8, 1)), epochs=1, verbose=0,
              callbacks=[TensorBoard(sys.argv[1]), counter])
except StorageError as e:
    print("ERROR", e, "BEGUN", begun)
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not can_make_read_only_views(), reason="needs root and unshare --mount")
def test_tensorboard_read_only_log_dir_is_a_storage_error_before_training(tmp_path):
    """An existing read-only directory passes makedirs; the write probe catches it."""
    log_dir = tmp_path / "tb"
    log_dir.mkdir()
    command = [sys.executable, "-c", TENSORBOARD_ON_A_READ_ONLY_DIRECTORY, str(log_dir)]
    done = subprocess.run(read_only_view(log_dir, command), env=worker_env(),
                          capture_output=True, text=True, timeout=100, check=False)
    assert re.search(r"^ERROR TensorBoard\.log_dir failed on \w+: StorageError: TensorBoard "
                     r"cannot write to log_dir '.*tb': .*Read-only file system.*\. Fix: check "
                     r"the permissions of log_dir.* BEGUN \[\]$", done.stdout, re.MULTILINE), (
        done.stdout + done.stderr[-3000:])
    assert os.listdir(log_dir) == []


def test_tensorboard_off_on_non_chief_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(TensorBoard, "is_chief", property(lambda self: False))
    log_dir = tmp_path / "tb"
    callback = TensorBoard(log_dir=str(log_dir), histogram_freq=1, update_freq="batch")
    history = _fit(_model(), [callback])
    assert len(history.history["loss"]) == 2
    assert callback.write_dir is None
    assert not any(files for _, _, files in os.walk(log_dir))


def test_tensorboard_scratch_on_non_chief_is_private_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(TensorBoard, "is_chief", property(lambda self: False))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    log_dir = tmp_path / "tb"
    callback = TensorBoard(log_dir=str(log_dir), non_chief="scratch")
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(_event_files(callback.write_dir))
    )
    _fit(_model(), [callback, probe])
    scratch = callback.write_dir
    assert scratch.startswith(str(tmp_path / "tmp" / "disttrain-scratch"))
    assert seen[-1], "non-chief wrote no events to its scratch directory"
    assert not os.path.exists(scratch)
    assert not any(files for _, _, files in os.walk(log_dir))


# ---------------------------------------------------------------- multi-worker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 2-worker cluster running every scenario of callback_workloads_misc."""
    workdir = tmp_path_factory.mktemp("misc-callbacks")
    for name in ("csv", "tb_off", "tb_scratch"):
        os.makedirs(workdir / name)
        os.chmod(workdir / name, 0o755)
    (workdir / "blocker").write_text("a file where the CSV directory should be")
    run = run_cluster(workloads.misc_callbacks, 2, kwargs={"workdir": str(workdir)},
                      timeout=360).assert_ok()
    assert [r["rank"] for r in run.results] == [0, 1]
    return workdir, run.results


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_lr_is_the_chiefs_on_every_worker(cluster):
    _, (chief, other) = cluster
    assert chief["reduce_lr"]["rates"] == pytest.approx([0.1, 0.01, 0.001])
    assert other["reduce_lr"]["rates"] == chief["reduce_lr"]["rates"]
    assert other["reduce_lr"]["weights"] == chief["reduce_lr"]["weights"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_csv_written_by_the_chief_only(cluster):
    workdir, (chief, other) = cluster
    if os.geteuid() == 0:
        assert other["csv_logger"]["unprivileged"], "non-chief kept write access"
        assert other["csv_logger"]["control_write"] == "PermissionError"
    assert os.listdir(workdir / "csv") == ["log.csv"]
    rows = list(csv.reader(io.StringIO((workdir / "csv" / "log.csv").read_text())))
    assert rows[0] == ["epoch", "loss", "val_loss"]
    assert [row[0] for row in rows[1:]] == ["0", "1", "0"]
    assert stat.S_IMODE(os.stat(workdir / "csv").st_mode) == 0o755


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_csv_chief_write_failure_raises_everywhere(cluster):
    _, (chief, other) = cluster
    failure = chief["csv_logger"]["failure"]
    assert failure and failure.startswith(
        "StorageError: CSVLogger.load failed on w0: StorageError: destination"), failure
    assert "blocker' is not writable" in failure, "found by the probe at train begin"
    assert other["csv_logger"]["failure"] == failure


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_tensorboard_off_only_chief_events(cluster):
    workdir, (chief, other) = cluster
    if os.geteuid() == 0:
        assert other["tensorboard_off"]["unprivileged"], "non-chief kept write access"
    assert other["tensorboard_off"]["write_dir"] is None
    events = _event_files(workdir / "tb_off")
    assert {os.path.basename(os.path.dirname(p)) for p in events} == {"train", "validation"}
    for path in events:
        assert f".{chief['pid']}." in os.path.basename(path), path
    assert ("train", "epoch_loss") in _summaries(workdir / "tb_off")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_tensorboard_scratch_is_private_and_removed(cluster):
    workdir, (chief, other) = cluster
    log_dir = str(workdir / "tb_scratch")
    assert chief["tensorboard_scratch"]["write_dir"] == log_dir
    scratch = other["tensorboard_scratch"]
    assert not scratch["write_dir"].startswith(str(workdir))
    assert any(n.startswith("events.out.tfevents.") for n in scratch["files_during_fit"])
    assert not scratch["exists_after_fit"]
    for path in _event_files(log_dir):
        assert f".{chief['pid']}." in os.path.basename(path), path


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_tensorboard_scratch_removed_at_exit_when_fit_raises(cluster):
    _, (chief, other) = cluster
    assert chief["tensorboard_scratch_fit_raises"]["error"] == "planned failure"
    scratch = other["tensorboard_scratch_fit_raises"]
    assert scratch["error"] == "planned failure"
    assert scratch["exists_after_error"], "on_train_end ran although fit raised"
    assert not os.path.exists(scratch["write_dir"])


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "scenario", ["nan_in_data", "nan_on_worker_1_only", "nan_on_worker_1_only_raise"]
)
def test_multi_worker_terminate_on_nan_stops_all_after_the_same_batch(cluster, scenario):
    _, (chief, other) = cluster
    a, b = chief["terminate_on_nan"][scenario], other["terminate_on_nan"][scenario]
    assert a["batches"] == b["batches"]
    assert len(a["batches"]) < 16, "training did not stop early"
    if scenario == "nan_on_worker_1_only":
        assert a["batches"] == [0, 1, 2, 3]
    if scenario.endswith("_raise"):
        assert a["error"] == b["error"]
        assert a["error"].startswith("RuntimeError: NaN or Inf loss encountered at batch 3")
    else:
        assert a["error"] is b["error"] is None
        assert a["epochs"] == b["epochs"] == 1
        assert a["stop_training"] and b["stop_training"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_terminate_on_nan_finite_loss_trains_fully(cluster):
    _, (chief, other) = cluster
    for result in (chief, other):
        clean = result["terminate_on_nan"]["no_nan"]
        assert clean["batches"] == list(range(8)) * 2
        assert clean["epochs"] == 2 and clean["last_loss_finite"]


def test_tensorboard_without_the_package_fails_at_construction():
    import subprocess
    import sys

    code = ("import sys; sys.modules['tensorboard'] = None; "
            "from disttrain import callbacks; callbacks.TensorBoard('logs')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "CallbackConfigError: TensorBoard needs the 'tensorboard' package" in proc.stderr
