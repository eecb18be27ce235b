"""ModelCheckpoint: Keras parity and the commit protocol in one process; chief-only atomic
writes and agreement on real clusters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.callbacks import checkpoint_workloads
from tests.callbacks.checkpoint_workloads import results_without_errors
from tests.support.cases import case_results
from tests.support.processes import can_make_read_only_views, read_only_view, run_until_killed

keras = pytest.importorskip("keras")

from disttrain import callbacks, storage  # noqa: E402
from disttrain.errors import CallbackConfigError, StorageError  # noqa: E402
from tests.support.scripted import drive, tiny_data, tiny_model


def test_checkpoint_save_best_only_and_filepath_formatting(tmp_path):
    x, y = tiny_data()
    path = str(tmp_path / "ckpt-{epoch:02d}-{val_loss:.2f}.keras")
    ckpt = callbacks.ModelCheckpoint(path, monitor="val_loss", save_best_only=True)
    tiny_model().fit(x, y, validation_data=(x, y), epochs=3, verbose=0, callbacks=[ckpt])
    saved = sorted(p for p in os.listdir(tmp_path) if p.endswith(".keras"))
    assert saved and all(p.startswith("ckpt-0") for p in saved)
    assert saved == sorted(os.path.basename(c["path"]) for c in ckpt.checkpoints)
    values = [c["value"] for c in ckpt.checkpoints]
    assert values == sorted(values, reverse=True), "only improvements are saved"
    manifest = json.loads((tmp_path / "best.json").read_text())
    assert manifest["path"] == ckpt.best_checkpoint()["path"]
    assert manifest["run_id"] == ckpt.run_id and manifest["monitor"] == "val_loss"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_checkpoint_same_files_as_keras_for_same_arguments(tmp_path):
    x, y = tiny_data()
    for name, module in (("ours", callbacks), ("keras", keras.callbacks)):
        keras.utils.set_random_seed(0)
        cb = module.ModelCheckpoint(str(tmp_path / name / "m-{epoch}.weights.h5"),
                                    save_weights_only=True, save_freq=3)
        os.makedirs(tmp_path / name, exist_ok=True)
        tiny_model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    ours = sorted(p for p in os.listdir(tmp_path / "ours") if p.endswith(".h5"))
    assert ours == sorted(os.listdir(tmp_path / "keras"))


def test_checkpoint_loads_and_equals_model(tmp_path):
    x, y = tiny_data()
    model = tiny_model()
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "last.keras"))
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ckpt])
    loaded = keras.models.load_model(tmp_path / "last.keras")
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_max_to_keep_keeps_best_or_latest(tmp_path):
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "best" / "e{epoch}.keras"),
                                     save_best_only=True, max_to_keep=2)
    drive(ckpt, [1.0, 0.5, 0.7, 0.4, 0.3])
    assert sorted(os.listdir(tmp_path / "best")) == ["best.json", "e4.keras", "e5.keras"]
    latest = callbacks.ModelCheckpoint(str(tmp_path / "last" / "e{epoch}.keras"), max_to_keep=2)
    drive(latest, [1.0, 0.5, 0.7, 0.9])
    assert sorted(os.listdir(tmp_path / "last")) == ["best.json", "e3.keras", "e4.keras"]
    assert json.loads((tmp_path / "last" / "best.json").read_text())["epoch"] == 3


def test_checkpoint_memory_url():
    ckpt = callbacks.ModelCheckpoint("memory://ckpt-test/{run_id}/m.keras")
    drive(ckpt, [1.0])
    directory = f"memory://ckpt-test/{ckpt.run_id}"
    assert storage.listdir(directory) == ["best.json", "m.keras"]
    assert storage.read_json(ckpt.manifest_url)["path"] == f"{directory}/m.keras"


def test_checkpoint_refuses_directory_of_another_run(tmp_path):
    storage.write_json(str(tmp_path / "best.json"), {"run_id": "other-run", "path": "x"})
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"))
    with pytest.raises(StorageError, match="holds checkpoints of run 'other-run'"):
        drive(ckpt, [1.0])
    assert not (tmp_path / "m-1.keras").exists()
    drive(callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"), overwrite=True), [1.0])
    assert (tmp_path / "m-1.keras").exists()


def test_checkpoint_never_replaces_a_file_it_did_not_write(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"precious")
    with pytest.raises(StorageError, match="was not written by run"):
        drive(callbacks.ModelCheckpoint(str(tmp_path / "m.keras")), [1.0])
    assert (tmp_path / "m.keras").read_bytes() == b"precious"


def _assert_holds(path, weights: dict):
    """Loads the `.keras` file at `path` and checks it holds exactly `weights` (a worker's
    `{variable path: values}`, in the model's order); returns the loaded model."""
    loaded = keras.models.load_model(path)
    for variable, value in zip(loaded.weights, weights.values()):
        np.testing.assert_array_equal(variable.numpy(), np.asarray(value))
    return loaded


def _drive_in_new_process(path: str, values: list[float], run_id: str) -> float:
    """`_drive` of a new save-best ModelCheckpoint in a new process of run `run_id` (a
    restarted attempt); returns its best value."""
    code = ("import sys, json; from tests.support.scripted import drive; "
            "from disttrain import callbacks; "
            "c = callbacks.ModelCheckpoint(sys.argv[1], save_best_only=True); "
            "drive(c, json.loads(sys.argv[2])); print(json.dumps(c.best))")
    proc = subprocess.run([sys.executable, "-c", code, path, json.dumps(values)],
                          env={**os.environ, "DISTTRAIN_RUN_ID": run_id}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checkpoint_restart_of_same_run_keeps_best(tmp_path):
    path = str(tmp_path / "e{epoch}.keras")
    assert _drive_in_new_process(path, [0.5], "restart-1") == pytest.approx(0.5)
    assert _drive_in_new_process(path, [0.9, 0.6, 0.4], "restart-1") == pytest.approx(0.4)
    assert sorted(os.listdir(tmp_path)) == ["best.json", "e1.keras", "e3.keras"]


def test_checkpoint_new_callback_in_a_second_fit_starts_fresh_like_keras(tmp_path):
    """A notebook: a second fit of the same process with a new save-best ModelCheckpoint
    saves at its first epoch (Keras's behaviour), even after the user deleted the file;
    the same callback object used again keeps its best, as Keras's does."""
    path = str(tmp_path / "best.keras")
    first = callbacks.ModelCheckpoint(path, save_best_only=True)
    drive(first, [0.5])
    os.remove(path)
    second = callbacks.ModelCheckpoint(path, save_best_only=True)
    drive(second, [0.9])
    assert os.path.exists(path) and second.best == pytest.approx(0.9)
    assert json.loads((tmp_path / "best.json").read_text())["value"] == pytest.approx(0.9)
    drive(second, [0.95])
    assert second.best == pytest.approx(0.9)


def test_checkpoint_unwritable_destination_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    x, y = tiny_data()
    model = tiny_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(StorageError, match="not writable"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[callbacks.ModelCheckpoint(str(blocker / "m.keras"))])
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_out_of_space_names_the_file_and_leaves_the_directory_as_it_was(tmp_path):
    import errno

    path = str(tmp_path / "m-{epoch}.keras")
    drive(callbacks.ModelCheckpoint(path), [1.0])
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model = tiny_model()
    model.save = full_disk
    with pytest.raises(StorageError, match=r"m-1\.keras' failed: OSError: \[Errno 28\] No space "
                                           r"left on device\. Fix: free space"):
        drive(callbacks.ModelCheckpoint(path), [0.5], model=model)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_checkpoint_async_commit_writes_what_a_synchronous_one_writes(tmp_path):
    values = [1.0, 0.5, 0.7, 0.4, 0.3]
    manifests = {}
    for mode in (False, True):
        directory = tmp_path / str(mode)
        ckpt = callbacks.ModelCheckpoint(str(directory / "e{epoch}.keras"), save_best_only=True,
                                         max_to_keep=2, async_commit=mode)
        drive(ckpt, values)
        assert sorted(os.listdir(directory)) == ["best.json", "e4.keras", "e5.keras"]
        manifest = json.loads((directory / "best.json").read_text())
        manifests[mode] = {k: v for k, v in manifest.items() if k not in ("run_id", "written_at")}
        for record in manifests[mode]["checkpoints"]:
            record["path"] = os.path.basename(record["path"])
            assert record.pop("time") > 0
        manifests[mode]["path"] = os.path.basename(manifests[mode]["path"])
        manifests[mode]["deleting"] = [os.path.basename(p) for p in manifests[mode]["deleting"]]
        assert manifests[mode]["training_finished"].pop("at")
    assert manifests[True] == manifests[False]


def test_checkpoint_async_commit_is_done_when_fit_returns(tmp_path):
    x, y = tiny_data()
    model = tiny_model()
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"), async_commit=True)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[ckpt])
    assert sorted(os.listdir(tmp_path)) == ["best.json", "m-1.keras", "m-2.keras", "m-3.keras"]
    loaded = keras.models.load_model(tmp_path / "m-3.keras")
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("async_commit", [False, True])
def test_checkpoint_commit_failure_is_raised_at_once_or_at_the_next_save(async_commit):
    """The checkpoint directory (memory://) becomes a file after the probe: the first
    commit fails. Synchronously it is raised by that save; with async_commit by the
    next one, which writes nothing, or by on_train_end when no save follows."""
    import fsspec

    for saves in (2, 1):
        ckpt = callbacks.ModelCheckpoint(f"memory://async-{async_commit}-{saves}/m-{{epoch}}.keras",
                                         async_commit=async_commit)
        ckpt.set_model(tiny_model())
        ckpt.on_train_begin()
        fs, directory = fsspec.core.url_to_fs(ckpt.directory)
        fs.rm(directory, recursive=True)
        fs.pipe(directory, b"not a directory")
        raised_at = None
        with pytest.raises(StorageError, match=r"ModelCheckpoint\.(save|result)"):
            for epoch in range(saves):
                raised_at = epoch
                ckpt.on_epoch_end(epoch, {"val_loss": 1.0, "loss": 1.0})
            raised_at = "train_end"
            ckpt.on_train_end()
        if not async_commit:
            assert raised_at == 0
        else:
            assert raised_at == (1 if saves == 2 else "train_end")
        assert fs.cat(directory) == b"not a directory"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filepath": "d/{epoch}/m.keras"}, "only \\{run_id\\} may appear"),
        ({"filepath": "m-{}.keras"}, "positional field"),
        ({"filepath": "m-{epoch.keras"}, "not a valid template"),
        ({"filepath": "m-{val_loss:.4x}.keras"}, "format spec"),
        ({"filepath": "m.keras", "max_to_keep": 0}, "max_to_keep=0"),
        ({"filepath": "m.keras", "save_freq": 0}, "save_freq=0"),
    ],
)
def test_checkpoint_bad_arguments(kwargs, match):
    with pytest.raises(CallbackConfigError, match=match):
        callbacks.ModelCheckpoint(**kwargs)


def test_checkpoint_template_key_missing_from_logs(tmp_path):
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "m-{val_acc:.2f}.keras"))
    with pytest.raises(CallbackConfigError, match=r"uses \['val_acc'\].*Available: loss, val_loss"):
        drive(ckpt, [1.0])


def test_checkpoint_missing_monitor_strict(tmp_path):
    ckpt = callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_auc",
                                     save_best_only=True)
    with pytest.raises(CallbackConfigError, match="'val_auc' is not in the logs"):
        drive(ckpt, [1.0])


# ------------------------------------------------------------------- real clusters
# The 2-worker cases share one cluster (`two_workers`, running
# checkpoint_workloads.two_worker_cases; each case its own model and folder, failing only
# its own test); the 3-worker one and the kill loop run alone.


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """The finished cluster of `checkpoint_workloads.two_worker_cases` and its directory."""
    directory = tmp_path_factory.mktemp("checkpoint-cases")
    (directory / checkpoint_workloads.READ_ONLY).mkdir()
    (directory / "chief-write-failure" / "m-2.keras").mkdir(parents=True)
    read_only = directory / checkpoint_workloads.READ_ONLY
    run = run_cluster(
        checkpoint_workloads.two_worker_cases, 2, kwargs={"directory": str(directory)},
        wrap=(lambda rank, cmd: cmd if rank == 0 else read_only_view(read_only, cmd))
        if can_make_read_only_views() else None,
        timeout=270,
    )
    return run, directory


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not can_make_read_only_views(), reason="needs root and unshare --mount")
def test_only_the_chief_writes_and_the_checkpoint_equals_its_weights(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    run = run_cluster(
        checkpoint_workloads.checkpoint_job, 3,
        kwargs={"filepath": str(dest / "m-{epoch}.keras"), "epochs": 3, "max_to_keep": 2},
        wrap=lambda rank, cmd: cmd if rank == 0 else read_only_view(dest, cmd),
    )
    results = results_without_errors(run)
    assert all(r["weights"] == results[0]["weights"] for r in results)
    assert all(r["checkpoints"] == results[0]["checkpoints"] for r in results)
    assert sorted(os.listdir(dest)) == ["best.json", "m-2.keras", "m-3.keras"]
    _assert_holds(dest / "m-3.keras", results[0]["weights"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_on_one_worker_ends_training_everywhere_at_the_same_epoch(two_workers):
    results = results_without_errors(two_workers[0], "stop_on_one_worker")
    assert [r["epochs_run"] for r in results] == [2, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("async_commit", [False, True])
def test_a_failed_commit_raises_the_same_error_on_every_worker(two_workers, async_commit):
    """The chief's memory:// directory becomes a file at the first epoch end: the
    first commit fails, raised on both workers by that save, or with async_commit by
    the next one."""
    run = two_workers[0]
    results = case_results(run, f"failed_commit_{'async' if async_commit else 'sync'}")
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], run.report()
    assert errors[0].startswith("StorageError: ModelCheckpoint.save failed on w0"), errors[0]
    assert "failing-commit" in errors[0]
    assert [r["epochs_ended"] for r in results] == [2 if async_commit else 1] * 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_commit_on_a_cluster_writes_only_on_the_chief_and_equals_its_weights(
        two_workers):
    run, directory = two_workers
    dest = directory / checkpoint_workloads.READ_ONLY
    results = results_without_errors(run, "async_commit")
    assert results[0]["weights"] == results[1]["weights"]
    assert sorted(os.listdir(dest)) == ["best.json", "m-2.keras", "m-3.keras"]
    _assert_holds(dest / "m-3.keras", results[0]["weights"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chief_write_failure_raises_the_same_error_on_every_worker(two_workers):
    run, directory = two_workers
    results = case_results(run, "chief_write_failure")
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], run.report()
    assert errors[0].startswith("StorageError: ModelCheckpoint.save failed on w0")
    assert "m-2.keras" in errors[0]
    assert max(r["seconds"] for r in results) < 120
    manifest = json.loads((directory / "chief-write-failure" / "best.json").read_text())
    assert manifest["epoch"] == 1, "the last good checkpoint stays the committed one"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mid_epoch_checkpoint_holds_batchnorm_statistics_of_all_workers(two_workers):
    """A save at batch 6 (the last of the epoch) must equal the final, averaged weights."""
    run, directory = two_workers
    results = results_without_errors(run, "mid_epoch")
    assert results[0]["weights"] == results[1]["weights"]
    loaded = _assert_holds(directory / "mid-epoch" / "m-1-6.keras", results[0]["weights"])
    assert len([v for v in loaded.weights if "moving" in v.path]) == 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,async_commit", [("ckpt-{epoch}.keras", False),
                                               ("best.keras", True)])
def test_checkpoint_manifest_survives_random_kills_and_restarts(tmp_path, name, async_commit):
    """SIGKILL a saving process at random moments, restart the same run each time.

    After every kill the manifest, once there is one, names only files that exist (a kill
    can land before the first commit); no restart is refused
    (a file committed just before a kill is this run's, not a stranger's). Names that
    change from save to save are claimed by the pending marker; a fixed name by the
    manifest. With async_commit (the fixed name: one variant per name keeps CI time; the
    commit protocol is the same code) the kills also land while a snapshot is written in
    the background.
    """
    import random

    from disttrain.testing import function_command, worker_env

    directory = tmp_path / "ckpt"
    rng = random.Random(0)

    def command(epochs: int) -> list[str]:
        return function_command(checkpoint_workloads.save_forever,
                                {"directory": str(directory), "name": name,
                                 "async_commit": async_commit, "epochs": epochs})

    env = worker_env({"DISTTRAIN_RUN_ID": "crash-loop",
                      "DISTTRAIN_TEST_RESULT": str(tmp_path / "result.json")})
    for attempt in range(4):
        err = run_until_killed(command(120 if async_commit else 400), env,
                               rng.uniform(0.05, 0.6))
        assert "Refusing" not in err, err[-2000:]
        if not (directory / "best.json").exists():  # killed before this run's first commit
            continue
        manifest = json.loads((directory / "best.json").read_text())
        for record in manifest["checkpoints"]:
            assert os.path.exists(record["path"]), (attempt, record, os.listdir(directory))
        assert os.path.exists(manifest["path"])
    # The run that is not killed: enough saves to cycle through every name (epoch % 7).
    final = subprocess.run(command(14), env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    kept = json.loads((tmp_path / "result.json").read_text())["kept"]
    assert sorted(os.listdir(directory)) == ["best.json", os.path.basename(kept[0])]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failure_of_the_background_serializer_reaches_every_worker(two_workers):
    """async_commit=True writes the file (ModelCheckpoint) or the backup's weights
    (BackupAndRestore) from a snapshot in the background; when that write fails (the model
    cannot be serialized), every worker raises the same StorageError at the next save, or at
    the end of fit, and what was committed before stays."""
    run = two_workers[0]
    outcomes = case_results(run, "serializer_failure")
    cases = {"ModelCheckpoint": ("ModelCheckpoint.save", "ModelCheckpoint.result",
                                 "m-2.keras'", ["best.json", "m-1.keras"]),
             "BackupAndRestore": ("BackupAndRestore.save", "BackupAndRestore.commit",
                                  "backup-000001'", ["backup-000000"])}
    for kind, (next_save, fit_end, failed, files) in cases.items():
        chief, other = (r[kind] for r in outcomes)
        for fit, epochs_ended in ((0, 3), (1, 2)):
            error = chief[fit]["error"]
            assert error is not None and error == other[fit]["error"], run.report()
            assert error.startswith(f"StorageError: {next_save if fit == 0 else fit_end} "
                                    "failed on w0"), error
            assert f"{failed} in the background failed: ValueError: Invalid dtype: object" \
                in error, error
            assert chief[fit]["epochs_ended"] == other[fit]["epochs_ended"] == epochs_ended
            assert chief[fit]["files"] == files, (kind, fit)
