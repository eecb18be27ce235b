"""CSVLogger: Keras parity in one process, chief-only writes on a real cluster.

The multi-worker tests share one real 2-worker cluster (the `callbacks_cluster` fixture
in tests/callbacks/conftest.py, running tests/callbacks/shared_cluster_workloads.py).
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat

import fsspec
import keras
import pytest

from disttrain.callbacks.csv_logger import CSVLogger
from disttrain.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from disttrain.errors import CallbackConfigError, StorageError
from tests.support.models import (
    parity_fit,
    parity_model,
)


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
    parity_fit(
        parity_model(metrics=["mae"]),
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
    model = parity_model()
    for epochs in (2, 3):
        parity_fit(model, [CSVLogger(ours, append=True),
                     keras.callbacks.CSVLogger(str(theirs), append=True)], epochs=epochs)
    text = _read_text(ours)
    with open(theirs, newline="") as f:
        assert text == f.read()
    assert len(re.findall("epoch", text)) == 1
    assert len(text.splitlines()) == 1 + 2 + 3


def test_csv_logger_reused_object_appends_like_keras(tmp_path):
    ours, theirs = str(tmp_path / "ours.tsv"), str(tmp_path / "keras.tsv")
    model = parity_model()
    callbacks = [CSVLogger(ours, separator="\t", append=True),
                 keras.callbacks.CSVLogger(theirs, separator="\t", append=True)]
    parity_fit(model, callbacks, epochs=1)
    parity_fit(model, callbacks, epochs=2)
    assert _read_text(ours) == _read_text(theirs)
    assert len(_read_text(ours).splitlines()) == 4


def test_csv_logger_without_append_replaces_the_file(tmp_path):
    url = str(tmp_path / "log.csv")
    parity_fit(parity_model(), [CSVLogger(url)], epochs=3)
    parity_fit(parity_model(), [CSVLogger(url)], epochs=1)
    rows = list(csv.DictReader(io.StringIO(_read_text(url))))
    assert [row["epoch"] for row in rows] == ["0"]


def test_csv_logger_header_mismatch_is_a_clear_error(tmp_path):
    url = str(tmp_path / "log.csv")
    parity_fit(parity_model(), [CSVLogger(url)], epochs=1)
    before = _read_text(url)
    with pytest.raises(CallbackConfigError) as info:
        parity_fit(parity_model(metrics=["mae"]), [CSVLogger(url, append=True)], epochs=1)
    message = str(info.value)
    assert "has the columns" in message and "'mae'" in message and "append=False" in message
    assert _read_text(url) == before


def test_csv_logger_unwritable_destination_fails_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    epochs = []
    counter = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs.append(epoch))
    with pytest.raises(StorageError, match=r"CSVLogger\.load failed on w0: StorageError: "
                                           r"destination '.*blocker' is not writable"):
        parity_fit(parity_model(), [CSVLogger(str(blocker / "log.csv")), counter], epochs=1)
    assert epochs == []


def test_csv_logger_write_failure_during_training_is_a_storage_error(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()

    def replace_directory_with_a_file(epoch, logs):
        directory.rmdir()
        directory.write_text("a file where a directory should be")

    breaker = keras.callbacks.LambdaCallback(on_epoch_end=replace_directory_with_a_file)
    with pytest.raises(StorageError, match=r"CSVLogger\.write failed"):
        parity_fit(parity_model(), [breaker, CSVLogger(str(directory / "log.csv"))], epochs=1)


def test_csv_logger_leaves_no_temp_files(tmp_path):
    parity_fit(parity_model(), [CSVLogger(str(tmp_path / "log.csv"))], epochs=3)
    assert sorted(os.listdir(tmp_path)) == ["log.csv"]





@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multi_worker_csv_written_by_the_chief_only(callbacks_cluster):
    workdir, (chief, other) = callbacks_cluster
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
def test_multi_worker_csv_chief_write_failure_raises_everywhere(callbacks_cluster):
    _, (chief, other) = callbacks_cluster
    failure = chief["csv_logger"]["failure"]
    assert failure and failure.startswith(
        "StorageError: CSVLogger.load failed on w0: StorageError: destination"), failure
    assert "blocker' is not writable" in failure, "found by the probe at train begin"
    assert other["csv_logger"]["failure"] == failure
