"""TensorBoard: Keras parity in one process; chief-only events and private scratch on a real
cluster.

The multi-worker tests share one real 2-worker cluster (the `callbacks_cluster` fixture
in tests/callbacks/conftest.py, running tests/callbacks/shared_cluster_workloads.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import keras
import pytest

from disttrain.callbacks.tensorboard import TensorBoard
from disttrain.errors import CallbackConfigError, StorageError
from disttrain.testing import worker_env
from tests.support.models import (
    parity_fit,
    parity_model,
)
from tests.support.processes import can_make_read_only_views, read_only_view


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
        parity_fit(parity_model(), [cls(log_dir=str(tmp_path / name), **kwargs)])
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
        parity_fit(parity_model(), [TensorBoard(log_dir="memory://tb")], epochs=1)


TENSORBOARD_ON_A_READ_ONLY_DIRECTORY = """
import sys
import keras
import numpy as np
from disttrain.callbacks.tensorboard import TensorBoard
from disttrain.errors import StorageError
from tests.support.models import dense_model
model = dense_model(2)
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
    history = parity_fit(parity_model(), [callback])
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
    parity_fit(parity_model(), [callback, probe])
    scratch = callback.write_dir
    assert scratch.startswith(str(tmp_path / "tmp" / "disttrain-scratch"))
    assert seen[-1], "non-chief wrote no events to its scratch directory"
    assert not os.path.exists(scratch)
    assert not any(files for _, _, files in os.walk(log_dir))





@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_tensorboard_off_only_chief_events(callbacks_cluster):
    workdir, (chief, other) = callbacks_cluster
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
def test_multi_worker_tensorboard_scratch_is_private_and_removed(callbacks_cluster):
    workdir, (chief, other) = callbacks_cluster
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
def test_multi_worker_tensorboard_scratch_removed_at_exit_when_fit_raises(callbacks_cluster):
    _, (chief, other) = callbacks_cluster
    assert chief["tensorboard_scratch_fit_raises"]["error"] == "planned failure"
    scratch = other["tensorboard_scratch_fit_raises"]
    assert scratch["error"] == "planned failure"
    assert scratch["exists_after_error"], "on_train_end ran although fit raised"
    assert not os.path.exists(scratch["write_dir"])



def test_tensorboard_without_the_package_fails_at_construction():
    import subprocess
    import sys

    code = ("import sys; sys.modules['tensorboard'] = None; "
            "from disttrain import callbacks; callbacks.TensorBoard('logs')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "CallbackConfigError: TensorBoard needs the 'tensorboard' package" in proc.stderr
