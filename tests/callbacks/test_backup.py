"""BackupAndRestore: resume after a failure, alone and on a real cluster restarted by the launcher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from disttrain.testing import function_command, run_cluster, worker_env
from tests.callbacks import checkpoint_workloads
from tests.support import REPO_ROOT
from tests.support.models import dense_model

keras = pytest.importorskip("keras")

from disttrain import callbacks, storage  # noqa: E402
from disttrain.errors import (  # noqa: E402
    PREEMPTED_EXIT_CODE,
    CallbackConfigError,
    Preempted,
    StorageError,
)


class Interrupt(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupt()


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    return x, x @ np.array([[1.0], [-2.0], [0.5]], dtype="float32")


def _model():
    model = dense_model(3, [4], seed=0)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _fit(model, cbs, epochs=6):
    x, y = _data()
    return model.fit(x, y, validation_data=(x, y), batch_size=16, epochs=epochs, shuffle=False,
                     verbose=0, callbacks=cbs)


def test_resumes_where_it_stopped_and_ends_like_an_uninterrupted_run(tmp_path):
    reference = _model()
    _fit(reference, [])
    model = _model()
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        _fit(model, [callbacks.BackupAndRestore(backup), InterruptAt(2)])
    assert storage.listdir(backup) == ["backup-000001"], (
        "one committed backup is kept: the one taken as epoch 3 began")
    resumed = _model()
    history = _fit(resumed, [callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 4, "epochs 3..6 only"
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not os.path.exists(backup), "delete_checkpoint=True removes it at the end"


def test_early_stopping_state_survives_the_restart(tmp_path):
    """mode='max' on a falling val_loss: the best is epoch 1, patience runs out at epoch 5.

    The interruption after epoch 4 loses it; the backup taken as epoch 4 began holds wait=2.
    """
    backup = str(tmp_path / "backup")
    snapshot = {}

    class FirstEpochWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                snapshot["weights"] = [w.copy() for w in self.model.get_weights()]

    first = callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=4)
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(backup), first, FirstEpochWeights(),
                        InterruptAt(3)])
    assert first.wait == 3
    second = callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=4)
    model = _model()
    history = _fit(model, [callbacks.BackupAndRestore(backup), second], epochs=10)
    assert len(history.history["loss"]) == 2, "patience carried over: stops after epoch 5"
    assert second.stopped_epoch == 4 and second.best_epoch == 0
    for got, want in zip(model.get_weights(), snapshot["weights"]):
        np.testing.assert_array_equal(got, want)


def test_state_applies_even_when_no_epoch_is_left(tmp_path):
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(backup), callbacks.EarlyStopping(),
                        InterruptAt(3)])
    stopper = callbacks.EarlyStopping()
    history = _fit(_model(), [stopper, callbacks.BackupAndRestore(backup)], epochs=3)
    assert history.history == {}
    assert stopper.best is not None and stopper.best_weights is not None


def test_an_uncommitted_newer_backup_is_ignored(tmp_path):
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(backup, delete_checkpoint=False),
                        InterruptAt(1)])
    torn = tmp_path / "backup" / "backup-000002"
    torn.mkdir()
    (torn / "model.weights.h5").write_bytes(b"torn")
    history = _fit(_model(), [callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    assert len(history.history["loss"]) == 5, "resumed from backup-000000 (epoch 2)"
    assert storage.listdir(backup) == ["backup-000005"]


def test_double_checkpoint_keeps_two(tmp_path):
    backup = str(tmp_path / "backup")
    _fit(_model(), [callbacks.BackupAndRestore(backup, double_checkpoint=True,
                                               delete_checkpoint=False)], epochs=3)
    assert storage.listdir(backup) == ["backup-000001", "backup-000002"], (
        "the one taken as epoch 3 began and the one taken at train end")
    assert all(storage.is_committed(storage.join(backup, n)) for n in storage.listdir(backup))


def test_retention_keeps_every_nth_epochs_backup_and_the_latest(tmp_path):
    backup = str(tmp_path / "backup")
    _fit(_model(), [callbacks.BackupAndRestore(
        backup, delete_checkpoint=False, retention=storage.Retention(every_epochs=2))], epochs=5)
    kept = [storage.read_manifest(storage.join(backup, n))["metadata"]["epoch"]
            for n in storage.listdir(backup)]
    assert kept == [2, 4, 5], "every 2nd epoch's backup, and the latest (taken at train end)"
    with pytest.raises(CallbackConfigError, match="backups have no monitored value"):
        callbacks.BackupAndRestore(backup, retention=storage.Retention(best=1))


def test_memory_url_and_run_id():
    cb = callbacks.BackupAndRestore("memory://backup-test/{run_id}", delete_checkpoint=False)
    _fit(_model(), [cb], epochs=1)
    assert storage.listdir(f"memory://backup-test/{cb.run_id}") == ["backup-000000"]


@pytest.mark.parametrize("kwargs, match", [
    ({"backup_dir": ""}, "empty"),
    ({"backup_dir": "b", "save_freq": 0}, "save_freq=0"),
    ({"backup_dir": "b", "save_freq": "batch"}, "save_freq='batch'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(CallbackConfigError, match=match):
        callbacks.BackupAndRestore(**kwargs)


def _reference_and_restarted(tmp_path, grace: int, job: dict | None = None,
                             **fault) -> tuple[dict, object, list]:
    """An uninterrupted 2-worker resume_job, and the same job with `fault` on attempt 0 under
    `launch.local --max-restarts 1`: (reference result, launcher process, attempt-1 results).
    `job` holds further resume_job arguments for both runs."""
    reference = run_cluster(
        checkpoint_workloads.resume_job, 2,
        kwargs={"result_dir": str(tmp_path), "backup_dir": str(tmp_path / "ref-backup"),
                **(job or {})},
    ).assert_ok().results[0]
    results = tmp_path / "restarted"
    results.mkdir()
    command = function_command(checkpoint_workloads.resume_job, {
        "result_dir": str(results), "backup_dir": str(tmp_path / "backup-{run_id}"),
        **(job or {}), **fault})
    proc = subprocess.run(
        [sys.executable, "-m", "launch.local", "--workers", "2", "--max-restarts", "1",
         "--grace", str(grace), "--", *command],
        env=worker_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "attempt 1" in proc.stderr
    assert not (results / "1-0.json").exists(), "worker 1 did not finish attempt 0"
    resumed = [json.loads((results / f"{rank}-1.json").read_text()) for rank in (0, 1)]
    assert resumed[0]["weights"] == resumed[1]["weights"]
    for name, value in reference["weights"].items():
        np.testing.assert_allclose(np.asarray(resumed[0]["weights"][name]), np.asarray(value),
                                   rtol=1e-5, atol=1e-6)
    return reference, proc, resumed


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launcher_restart_resumes_a_crashed_cluster(tmp_path):
    """Worker 1 dies at the end of epoch 3; launch.local restarts the group; it resumes at epoch 3
    and ends equal to an uninterrupted run.

    (The backup of epoch 3's end would have been taken as epoch 4 began.)
    """
    reference, _, resumed = _reference_and_restarted(tmp_path, grace=5, crash_epoch=2)
    assert [r["epochs_run"] for r in resumed] == [3, 3], "epochs 3 to 5 only"
    assert resumed[0]["best_epoch"] == reference["best_epoch"]


class InterruptAtBatch(keras.callbacks.Callback):
    def __init__(self, epoch, batch, action=None):
        super().__init__()
        self.at = (epoch, batch)
        self.action = action
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            if self.action is None:
                raise Interrupt()
            self.action()


def test_integer_save_freq_resumes_inside_the_epoch(tmp_path):
    """4 batches per epoch, a backup every 3: the last one before the interruption at
    epoch 3, batch 2 was taken after epoch 3's first batch; the resumed run trains
    batches 2 to 4 of epoch 3 and ends equal to an uninterrupted run."""
    reference = _model()
    _fit(reference, [])
    backup = str(tmp_path / "backup")
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(backup, save_freq=3), InterruptAtBatch(2, 1)])
    [name] = storage.listdir(backup)
    metadata = storage.read_manifest(storage.join(backup, name))["metadata"]
    assert (metadata["epoch"], metadata["batches"]) == (2, 1)
    seen = []

    class Batches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    resumed = _model()
    history = _fit(resumed, [callbacks.BackupAndRestore(backup, save_freq=3), Batches()])
    assert len(history.history["loss"]) == 4, "epochs 3..6"
    assert seen[:4] == [1, 2, 3, 0], "epoch 3 goes on at its second batch"
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("async_commit", [False, True])
def test_sigterm_saves_a_backup_at_the_next_step_and_exits_75(tmp_path, async_commit):
    """SIGTERM during epoch 2's second batch (after BackupAndRestore's hook for it): the
    backup is taken after the third (and, with async_commit, committed before Preempted is
    raised); the resumed run trains the fourth and ends equal to an uninterrupted run."""
    reference = _model()
    _fit(reference, [])
    backup = str(tmp_path / "backup")
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as raised:
        _fit(_model(), [callbacks.BackupAndRestore(backup, async_commit=async_commit),
                        InterruptAtBatch(1, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    assert raised.value.code == PREEMPTED_EXIT_CODE == 75
    assert "backup saved at epoch 2, batch 3" in str(raised.value)
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler is put back"
    [name] = storage.listdir(backup)
    metadata = storage.read_manifest(storage.join(backup, name))["metadata"]
    assert (metadata["epoch"], metadata["batches"]) == (1, 3)
    resumed = _model()
    history = _fit(resumed, [callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 5
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_preemption_on_an_epochs_last_batch_backs_up_after_that_epochs_end(tmp_path):
    """SIGTERM during epoch 2's third batch: the agreed stop is the fourth, the epoch's last.
    Epoch 2 still validates, calls on_epoch_end and writes its CSV row; the backup is taken
    as epoch 3 begins; the resumed run trains epochs 3 to 6, each with its training loss,
    and ends equal to an uninterrupted run."""
    reference = _model()
    _fit(reference, [])
    backup, log = str(tmp_path / "backup"), str(tmp_path / "log.csv")
    with pytest.raises(Preempted, match=r"backup saved at the end of epoch 2; exiting with 75"):
        _fit(_model(), [callbacks.BackupAndRestore(backup), callbacks.CSVLogger(log, append=True),
                        InterruptAtBatch(1, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    [name] = storage.listdir(backup)
    metadata = storage.read_manifest(storage.join(backup, name))["metadata"]
    assert (metadata["epoch"], metadata["batches"]) == (2, 0)
    resumed = _model()
    history = _fit(resumed, [callbacks.BackupAndRestore(backup),
                             callbacks.CSVLogger(log, append=True)])
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 4
    rows = [line.split(",") for line in open(log).read().splitlines()]
    assert [row[0] for row in rows] == ["epoch", "0", "1", "2", "3", "4", "5"]
    assert all(row[rows[0].index("loss")] for row in rows[1:]), "every epoch has its loss"
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_backup_of_another_architecture_is_refused_and_kept(tmp_path):
    backup = tmp_path / "backup"
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(str(backup)), InterruptAt(2)])
    before = {p: p.read_bytes() for p in backup.rglob("*") if p.is_file()}
    wider = dense_model(3, [5], seed=0)
    wider.compile(keras.optimizers.Adam(0.01), "mse")
    with pytest.raises(CallbackConfigError, match=r"different model.*variable #0 .*\(3, 4\) "
                       r"float32 in the backup, .*\(3, 5\) float32 in this model.*Fix: give"):
        _fit(wider, [callbacks.BackupAndRestore(str(backup))])
    assert {p: p.read_bytes() for p in backup.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_on_one_worker_stops_all_at_one_step_and_the_restart_resumes_there(tmp_path):
    """Worker 1 gets SIGTERM after step 5 (of 6-batch epochs) and waits for both
    acknowledgements, so the stop is agreed on step 6, epoch 1's last batch: both workers
    run epoch 1's end (validation, EarlyStopping, its CSV row), back up as epoch 2 begins
    and exit 75; launch.local restarts the group, which trains epochs 2 to 5 and ends equal
    to an uninterrupted run, each epoch's row once in the log."""
    log = tmp_path / "log.csv"
    reference, proc, resumed = _reference_and_restarted(tmp_path, grace=20, sigterm_step=5,
                                                        csv_path=str(log))
    for worker in ("w0", "w1"):
        assert (f"[{worker}] disttrain: preempted (SIGTERM on w1): backup saved at the end of "
                "epoch 1; exiting with 75") in proc.stderr, proc.stderr[-5000:]
        assert re.search(worker + r" +0 +[\d.]+s +75\*?\s", proc.stderr), (
            f"{worker} exited 75 by itself in attempt 0")
    assert "the others save the same backup and exit too" in proc.stderr
    assert [r["epochs_run"] for r in resumed] == [4, 4], "epochs 2 to 5"
    assert resumed[0]["best_epoch"] == reference["best_epoch"]
    rows = [line.split(",") for line in log.read_text().splitlines()]
    assert [row[0] for row in rows] == ["epoch", "0", "1", "2", "3", "4"]
    assert all(row[rows[0].index("loss")] and row[rows[0].index("val_loss")]
               for row in rows[1:])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_with_steps_per_execution_stops_and_resumes_between_calls(tmp_path):
    """compile(steps_per_execution=2): 6 batches an epoch are 3 calls. Worker 1 gets
    SIGTERM after its 4th call (epoch 2, batch 2); both save one backup after the 5th
    call (batch 4) and the restart ends equal to an uninterrupted k=2 run."""
    _, proc, resumed = _reference_and_restarted(
        tmp_path, grace=20, job={"steps_per_execution": 2}, sigterm_step=4)
    saved = re.findall(r"\[(w\d)\] disttrain: preempted \(SIGTERM on w1\): backup saved at "
                       r"epoch (\d), batch (\d); exiting with 75", proc.stderr)
    assert sorted(w for w, *_ in saved) == ["w0", "w1"], proc.stderr[-5000:]
    assert {(int(e), int(b)) for _, e, b in saved} == {(2, 4)}, "both after the call agreed"
    assert [r["epochs_run"] for r in resumed] == [6 - 2] * 2


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("async_commit", [False, True])
def test_backups_survive_random_kills_and_leftovers_are_cleaned(tmp_path, async_commit):
    """SIGKILL a process in the middle of fit() (backing up every epoch) at random moments.

    After every kill the newest committed backup loads, whatever was half-written beside
    it; each restart resumes from it; the last run leaves exactly one backup, no temp file.
    With async_commit the kills also land while the background thread writes and commits.
    Three kills per variant (six in all, as before the async variant was added: CI time).
    """
    import random
    import time

    directory = tmp_path / "backup"
    rng = random.Random(1 + async_commit)
    command = function_command(checkpoint_workloads.backup_forever,
                               {"directory": str(directory), "async_commit": async_commit})
    env = worker_env({"DISTTRAIN_RUN_ID": "backup-crash-loop",
                      "DISTTRAIN_TEST_RESULT": str(tmp_path / "result.json")})
    resumed_at = []
    for attempt in range(3):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline().split()
            assert line[:1] == ["READY"], proc.stderr.read()[-3000:]
            resumed_at.append(int(line[1]))
            time.sleep(rng.uniform(0.2, 1.5))
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        committed = [n for n in storage.listdir(str(directory))
                     if storage.is_committed(storage.join(str(directory), n))]
        assert committed, (attempt, os.listdir(directory))
        newest = directory / committed[-1] / "model.weights.h5"
        model = dense_model(4, [64])
        model.compile(keras.optimizers.Adam(0.01), "mse")
        model.optimizer.build(model.trainable_variables)
        model.load_weights(str(newest))
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0, resumed_at
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    [left] = os.listdir(directory)
    assert storage.is_committed(str(directory / left))
    assert sorted(os.listdir(directory / left)) == [storage.MANIFEST_NAME, "model.weights.h5"], (
        "no temp file is left behind")


def test_an_unwritable_backup_dir_fails_before_the_first_epoch(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    epochs = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    with pytest.raises(StorageError, match=r"is not writable.*Fix:"):
        _fit(_model(), [callbacks.BackupAndRestore(str(blocker / "backup")), Count()])
    assert epochs == []


def test_a_resumed_csv_log_holds_every_epoch_once(tmp_path):
    """The crash after epoch 3's row was written: the backup (taken as epoch 3 began) holds
    the file's length then, so the resumed run writes epoch 3 again without a duplicate."""
    backup, log = str(tmp_path / "backup"), str(tmp_path / "log.csv")
    with pytest.raises(Interrupt):
        _fit(_model(), [callbacks.BackupAndRestore(backup), callbacks.CSVLogger(log, append=True),
                        InterruptAt(2)])
    assert [line.split(",")[0] for line in open(log).read().splitlines()] == [
        "epoch", "0", "1", "2"]
    _fit(_model(), [callbacks.CSVLogger(log, append=True), callbacks.BackupAndRestore(backup)])
    assert [line.split(",")[0] for line in open(log).read().splitlines()] == [
        "epoch", "0", "1", "2", "3", "4", "5"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_saves_one_backup_and_the_next_run_resumes_from_it(tmp_path):
    """The launcher passes SIGTERM to both workers: they agree on one step, save one
    backup and exit 75; the launcher exits 143; the same run started again resumes there."""
    import signal as signals
    import time

    results = tmp_path / "results"
    results.mkdir()
    command = function_command(checkpoint_workloads.resume_job, {
        "result_dir": str(results), "backup_dir": str(tmp_path / "backup"), "epochs": 400})
    launcher = [sys.executable, "-m", "launch.local", "--workers", "2", "--run-id", "term-run",
                "--grace", "30", "--", *command]
    proc = subprocess.Popen(launcher, env=worker_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "backup").glob("backup-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signals.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-5000:]
    saved = re.findall(r"\[(w\d)\] disttrain: preempted \(SIGTERM on w\d\): backup saved at "
                       r"(?:epoch (\d+), batch (\d+)|the end of epoch (\d+));", err)
    assert sorted(w for w, *_ in saved) == ["w0", "w1"], err[-5000:]
    assert len({tuple(where) for _, *where in saved}) == 1, "one agreed step"
    assert re.search(r"w0 +75 \(preempted\)", err) and re.search(r"w1 +75 \(preempted\)", err)
    _, epoch, batch, ended = saved[0]
    # A backup at the end of epoch E resumes at epoch E + 1, batch 0.
    epoch, batch = (int(epoch), int(batch)) if epoch else (int(ended) + 1, 0)
    [name] = storage.listdir(str(tmp_path / "backup"))
    metadata = storage.read_manifest(storage.join(str(tmp_path / "backup"), name))["metadata"]
    assert (metadata["epoch"] + 1, metadata["batches"]) == (epoch, batch)
    again = subprocess.run(
        [*launcher[:launcher.index("--grace")], "--", *function_command(
            checkpoint_workloads.resume_job, {"result_dir": str(results),
                                            "backup_dir": str(tmp_path / "backup"),
                                            "epochs": epoch})],
        env=worker_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-5000:]
    resumed = json.loads((results / "0-0.json").read_text())
    assert resumed["epochs_run"] == 1, "only the rest of the interrupted epoch"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_backups_hold_the_weights_of_their_step_like_synchronous_ones(tmp_path):
    """Two BackupAndRestore callbacks in one 2-worker fit back up every 3 batches, one
    synchronously and one with async_commit (snapshot, then write in the background while
    training goes on): every backup of both holds the same weights, optimizer state and
    position, both sides record the same backups on every worker, and all are committed
    when fit returns."""
    run = run_cluster(checkpoint_workloads.async_backup_job, 2,
                      kwargs={"directory": str(tmp_path)}, timeout=240).assert_ok()
    chief, other = run.results
    assert len(chief["same"]) == 8 and all(chief["same"].values()), chief["same"]
    assert chief["records"]["sync"] == chief["records"]["async"] == list(range(8))
    assert other["records"] == chief["records"]
    for mode in ("sync", "async"):
        assert all(storage.is_committed(str(tmp_path / mode / name))
                   for name in os.listdir(tmp_path / mode)), mode
