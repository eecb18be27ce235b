"""ModelCheckpoint and BackupAndRestore writing gs:// from a real cluster to a real GCS emulator."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.callbacks import checkpoint_workloads
from tests.support.models import dense_model

keras = pytest.importorskip("keras")

from disttrain import storage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def gcs_env(gcs):
    """The environment that points worker processes at the emulator."""
    return {storage.ENV_STORAGE_EMULATOR_HOST: gcs.endpoint}


@pytest.mark.parametrize("async_commit", [False, True])
def test_checkpoints_from_two_workers_to_gcs(gcs, gcs_env, async_commit):
    """With async_commit the uploads run in the chief's background thread."""
    base = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
    run = run_cluster(
        checkpoint_workloads.checkpoint_job, 2, env=gcs_env,
        kwargs={"filepath": base + "/{run_id}/m-{epoch}.keras", "epochs": 3, "max_to_keep": 2,
                "async_commit": async_commit},
    ).assert_ok()
    results = run.results
    assert [r["error"] for r in results] == [None, None], run.report()
    directory = f"{base}/{results[0]['run_id']}"
    assert storage.listdir(directory) == ["best.json", "m-2.keras", "m-3.keras"]
    manifest = storage.read_json(storage.join(directory, "best.json"))
    assert manifest["run_id"] == results[0]["run_id"]
    with storage.local_copy(storage.join(directory, "m-3.keras")) as path:
        loaded = keras.models.load_model(path)
    for variable, value in zip(loaded.weights, results[0]["weights"].values()):
        np.testing.assert_array_equal(variable.numpy(), np.asarray(value))


def test_backup_and_restore_on_gcs(gcs, gcs_env, tmp_path):
    backup = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/backup"
    run = run_cluster(
        checkpoint_workloads.resume_job, 2, env=gcs_env,
        kwargs={"result_dir": str(tmp_path), "backup_dir": backup, "epochs": 2},
    ).assert_ok()
    assert run.results[0]["weights"] == run.results[1]["weights"]
    names = storage.listdir(backup)
    assert names == ["backup-000001"], names
    assert storage.is_committed(storage.join(backup, names[0]))
    again = run_cluster(
        checkpoint_workloads.resume_job, 2, env=gcs_env,
        kwargs={"result_dir": str(tmp_path), "backup_dir": backup, "epochs": 2},
    ).assert_ok()
    assert [r["epochs_run"] for r in again.results] == [0, 0], "both restored the finished run"
    assert again.results[0]["weights"] == run.results[0]["weights"]


def test_checkpoint_saves_to_gcs_make_no_reads_after_the_first(gcs):
    """The chief keeps the manifest and the pending marker it wrote, so each later save
    of a fixed name to gs:// is two uploads (the file, then the manifest) and no reads."""
    from disttrain import callbacks

    model = dense_model(4, outputs=2)
    model.compile("sgd", "mse")
    directory = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
    checkpoint = callbacks.ModelCheckpoint(directory + "/best.keras")
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    offset = gcs.log_size()
    for epoch in range(1, 4):
        checkpoint.on_epoch_end(epoch, {"loss": 1.0})
    methods = [line.split('"')[1].split()[0] for line in gcs.requests_since(offset)]
    assert methods == ["POST"] * 6, gcs.requests_since(offset)
    manifest = storage.read_json(storage.join(directory, "best.json"))
    assert manifest["epoch"] == 4 and manifest["path"] == directory + "/best.keras"
    assert storage.listdir(directory) == ["best.json", "best.keras"]
