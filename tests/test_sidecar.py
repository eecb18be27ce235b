"""disttrain.SidecarEvaluator: the demo's evaluator task beside 2 real workers, a slow writer,
a checkpoint of another architecture, a killed and restarted evaluator, gs:// through the
emulator, and its errors."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from disttrain import storage
from disttrain.errors import CallbackConfigError, ClusterConfigError, CoordinationError
from disttrain.testing import function_command, kill_group, run_launcher, worker_env
from tests import sidecar_workloads
from tests.support.models import dense_model

keras = pytest.importorskip("keras")

import disttrain  # noqa: E402

RUN = "sidecar-run"
INDEX = "best.json"


def _rows(csv_url: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(csv_url).decode())))


def _wait_rows(csv_path: Path, count: int, proc: subprocess.Popen, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if csv_path.exists() and len(_rows(str(csv_path))) >= count:
            return
        assert proc.poll() is None, f"evaluator exited with {proc.returncode}"
        time.sleep(0.1)
    raise AssertionError(f"{csv_path} did not reach {count} row(s) within {within} s")


def _keras_bytes(tmp_path: Path, units: int, seed: int) -> bytes:
    path = tmp_path / f"model-{units}-{seed}.keras"
    sidecar_workloads.tiny_model(units, seed).save(path)
    return path.read_bytes()


def _commit(manager: storage.CheckpointManager, epoch: int, data: bytes) -> str:
    """Commits `data` as the checkpoint of `epoch` the way ModelCheckpoint does."""
    path = storage.join(manager.directory, f"m-{epoch}.keras")
    manager.save_file({"path": path, "epoch": epoch, "batch": None, "monitor": "val_loss",
                       "value": None}, lambda local: Path(local).write_bytes(data))
    return path


def _close(expected: dict, row: dict) -> None:
    for name, value in expected.items():
        assert math.isclose(float(row[name]), value, rel_tol=1e-5, abs_tol=1e-6), (name, row)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_evaluator_beside_two_workers_evaluates_every_committed_checkpoint(tmp_path):
    out = tmp_path / "out"
    job = run_launcher(["--workers", "2", "--evaluator", "--", sys.executable, "-m",
                        "disttrain.demo", "--epochs", "4", "--output-dir", str(out)],
                       timeout=360, cwd=tmp_path)
    assert job.returncode == 0 and job.survivors == [], job.report()
    (run_dir,) = out.iterdir()
    manifest = json.loads((run_dir / "checkpoints" / INDEX).read_text())
    assert storage.training_finished(manifest)["run_id"] == run_dir.name
    # The chief saves an epoch when val_loss improves (save_best_only): those are committed.
    best, committed = math.inf, []
    for row in _rows(str(run_dir / "history.csv")):
        if float(row["val_loss"]) < best:
            best, committed = float(row["val_loss"]), [*committed, int(row["epoch"]) + 1]
    rows = _rows(str(run_dir / "evaluation.csv"))
    skipped = [int(e) for e in re.findall(
        r"^\[evaluator\] SidecarEvaluator: skipped .* \(epoch (\d+)\)", job.stdout, re.MULTILINE)]
    assert sorted([int(r["epoch"]) for r in rows] + skipped) == committed, job.stdout[-3000:]
    assert [int(r["epoch"]) for r in rows][-1] == committed[-1], "the final one is evaluated"
    assert "could not load" not in job.stderr
    # Every row equals model.evaluate of its file in a separate process (retention may have
    # deleted the oldest files since).
    kept = [r for r in rows if os.path.exists(r["path"])]
    assert len(kept) >= 2
    result = tmp_path / "evaluate.json"
    proc = subprocess.run(
        function_command(sidecar_workloads.evaluate_files,
                         {"paths": [r["path"] for r in kept], "batch_size": 64}),
        env=worker_env({"DISTTRAIN_TEST_RESULT": str(result)}), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected, row in zip(json.loads(result.read_text()), kept, strict=True):
        _close(expected, row)
    best_row = min(rows, key=lambda r: float(r["loss"]))
    export = json.loads((run_dir / "best_evaluated" / INDEX).read_text())
    assert os.path.basename(export["path"]) == os.path.basename(best_row["path"])
    assert export["checkpoint"] == best_row["path"] and export["epoch"] == int(best_row["epoch"])
    assert list((run_dir / "tensorboard" / "eval").glob("events.out.tfevents.*"))
    assert "[evaluator]   evaluated " in job.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_writer_bad_checkpoint_and_a_restarted_evaluator(tmp_path):
    """A file written in place while the evaluator polls is not read before the manifest
    lists it; a checkpoint of another architecture is reported and skipped; an evaluator
    killed and started again resumes after its last row and ends with training."""
    directory = tmp_path / "run" / "checkpoints"
    csv_path = tmp_path / "run" / "evaluation.csv"
    manager = storage.CheckpointManager(str(directory), RUN, index_name=INDEX, overwrite=True)
    manager.open()
    command = function_command(sidecar_workloads.evaluate_directory,
                               {"checkpoint_dir": str(directory), "log_dir": str(tmp_path / "run")})
    env = worker_env({"DISTTRAIN_RUN_ID": RUN})
    good = {epoch: _keras_bytes(tmp_path, 2, epoch) for epoch in (1, 2, 4)}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _commit(manager, 1, good[1])
        _wait_rows(csv_path, 1, first)
        slow = directory / "m-2.keras"
        with open(slow, "wb") as f:  # a writer without atomic commits, a chunk every 0.25 s
            for start in range(0, len(good[2]), len(good[2]) // 8 + 1):
                f.write(good[2][start:start + len(good[2]) // 8 + 1])
                f.flush()
                time.sleep(0.25)
        _commit(manager, 2, good[2])
        _wait_rows(csv_path, 2, first)
        first.kill()
        _, first_err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            kill_group(first)
    assert "could not load" not in first_err and "Traceback" not in first_err, first_err
    other = _commit(manager, 3, _keras_bytes(tmp_path, 3, 3))
    _commit(manager, 4, good[4])
    manager.finish()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after epoch 2" in second.stdout, second.stdout
    assert f"could not load {other} (epoch 3), skipped" in second.stderr, second.stderr
    rows = _rows(str(csv_path))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 4]
    assert [os.path.basename(r["path"]) for r in rows] == ["m-1.keras", "m-2.keras", "m-4.keras"]
    for row in rows:
        model = keras.models.load_model(row["path"])
        _close(model.evaluate(sidecar_workloads.tiny_data(), verbose=0, return_dict=True), row)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gcs_checkpoints_csv_and_export(gcs):
    base = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/{{run_id}}"
    directory = base.format(run_id=RUN) + "/checkpoints"
    manager = storage.CheckpointManager(directory, RUN, index_name=INDEX)
    manager.open()
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in (1, 2):
            _commit(manager, epoch, _keras_bytes(Path(tmp), 2, epoch))
    manager.finish()
    evaluator = disttrain.SidecarEvaluator(
        sidecar_workloads.tiny_model(), sidecar_workloads.tiny_data(), base + "/checkpoints",
        export_dir=base + "/best_evaluated", monitor="accuracy", run_id=RUN, poll_interval=0.2,
        timeout=30, verbose=0)
    rows = evaluator.start()
    assert evaluator.csv_path == base.format(run_id=RUN) + "/evaluation.csv"
    assert [int(r["epoch"]) for r in _rows(evaluator.csv_path)] == [1, 2] == [
        r["epoch"] for r in rows]
    export = storage.read_json(base.format(run_id=RUN) + "/best_evaluated/" + INDEX)
    best = max(rows, key=lambda r: (r["accuracy"], -r["epoch"]))
    assert export["checkpoint"] == best["path"] and export["value"] == best["accuracy"]
    assert storage.exists(export["path"])


@pytest.mark.timeout(120)
def test_latest_only_and_max_evaluations(tmp_path):
    directory = str(tmp_path / "checkpoints")
    manager = storage.CheckpointManager(directory, RUN, index_name=INDEX)
    manager.open()
    paths = [_commit(manager, epoch, _keras_bytes(tmp_path, 2, epoch)) for epoch in (1, 2, 3)]
    manager.finish()

    def run(log_dir: str, **options) -> disttrain.SidecarEvaluator:
        evaluator = disttrain.SidecarEvaluator(
            sidecar_workloads.tiny_model(), sidecar_workloads.tiny_data(), directory,
            log_dir=str(tmp_path / log_dir), run_id=RUN, timeout=5, verbose=0, **options)
        evaluator.start()
        return evaluator

    latest = run("latest", latest_only=True)
    assert [r["path"] for r in latest.evaluations] == paths[2:]
    assert [r["path"] for r in latest.skipped] == paths[:2]
    first = run("first", max_evaluations=1)
    assert [r["path"] for r in first.evaluations] == paths[:1] and first.skipped == []
    assert [r["epoch"] for r in _rows(first.csv_path)] == ["1"]


@pytest.mark.timeout(120)
def test_training_that_disappears_is_a_clear_error_and_bad_arguments(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    evaluator = disttrain.SidecarEvaluator(sidecar_workloads.tiny_model(),
                                           sidecar_workloads.tiny_data(), directory,
                                           poll_interval=0.1, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(CoordinationError, match="no new checkpoint in .*checkpoints.* and no "
                       r"'training finished' mark .* \(no checkpoint was committed\).*raise timeout"):
        evaluator.start()
    assert time.monotonic() - started < 5
    with pytest.raises(CallbackConfigError, match="not compiled"):
        disttrain.SidecarEvaluator(dense_model(4, outputs=2), None, directory)
    with pytest.raises(CallbackConfigError, match=r"steps=0\): must be a positive integer"):
        disttrain.SidecarEvaluator(sidecar_workloads.tiny_model(), None, directory, steps=0)
    monkeypatch.delenv("DISTTRAIN_RUN_ID", raising=False)
    with pytest.raises(ClusterConfigError, match="needs the training run's id, and "
                       "DISTTRAIN_RUN_ID is not set"):
        disttrain.SidecarEvaluator(sidecar_workloads.tiny_model(), None,
                                   str(tmp_path / "{run_id}" / "checkpoints"))
