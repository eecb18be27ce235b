"""disttrain.report: a run directory's curves and summary; the demo's figure locally and on gs://."""

from __future__ import annotations

import subprocess
import sys

import pytest

from disttrain import storage
from disttrain.report import history as report
from disttrain.testing import worker_env
from tests.support import REPO_ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(directory: str, epochs: int = 12, with_times: bool = True) -> None:
    """A run of `epochs` epochs: the LR halves from epoch 7, val_loss is best at epoch 9,
    and a second process resumed at epoch 5."""
    rows = ["epoch,accuracy,learning_rate,loss,val_accuracy,val_loss"]
    for e in range(epochs):
        val_loss = 1.1 / (e + 1) + (0.05 if e > 8 else 0)
        rows.append(f"{e},{0.8 + 0.01 * e},{0.01 if e < 6 else 0.005},{1 / (e + 1)},"
                    f"{0.78 + 0.01 * e},{val_loss}")
    storage.atomic_write_bytes(storage.join(directory, "history.csv"),
                               ("\n".join(rows) + "\n").encode())
    if with_times:
        storage.write_json(storage.join(directory, "history.json"), {
            "monitor": "val_loss", "mode": "min",
            "epochs": {str(e + 1): {"seconds": 1.0 + e, "ended": e} for e in range(epochs)},
            "starts": [{"epoch": 1, "process": "a", "attempt": "0", "time": 0},
                       {"epoch": 3, "process": "a", "attempt": "0", "time": 1},
                       {"epoch": 5, "process": "b", "attempt": "1", "time": 2}]})


def test_a_run_with_a_restart_and_an_lr_change_on_any_fsspec_url():
    directory = "memory://report-test/run-1"
    _write_run(directory)
    run = report.read_run(directory)
    assert run.epochs == list(range(1, 13)) and run.monitor == "val_loss"
    assert run.best()[0] == 9
    assert run.lr_changes() == [(7, 0.005)]
    assert run.restarts == [5], "a second fit in the same process is not a restart"
    url = report.write_figure(run)
    assert url == f"{directory}/history.png"
    assert storage.read_bytes(url).startswith(PNG)
    assert report.summary(run, url).splitlines() == [
        f"run {directory}",
        "  epochs        12",
        "  best          val_loss 0.1222 at epoch 9 (min is better)",
        "  last          val_loss 0.1417 at epoch 12",
        "  time/epoch    median 6.50s, slowest 12.00s (epoch 12)",
        "  lr changes    0.005 from epoch 7",
        "  restarts      1 (resumed at epoch 5)",
        f"  figure        {url}",
    ]


def test_a_running_run_without_epoch_times_and_a_maximised_monitor(tmp_path):
    _write_run(str(tmp_path), epochs=3, with_times=False)
    run = report.read_run(str(tmp_path))
    assert (run.monitor, run.mode, run.seconds, run.restarts) == ("val_loss", "min", {}, [])
    assert report.better_mode("val_accuracy") == "max" and report.better_mode("mse") == "min"
    assert "time/epoch" not in report.summary(run)


def test_without_matplotlib_one_line_notice_and_no_failure(tmp_path, monkeypatch, capsys):
    _write_run(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    assert report.write_figure(report.read_run(str(tmp_path))) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "disttrain[report]"' in err, err
    assert not (tmp_path / "history.png").exists()


def test_cli_summarises_a_run_directory_and_names_a_missing_one(tmp_path):
    _write_run(str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "disttrain.report", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "  restarts      1 (resumed at epoch 5)" in done.stdout
    assert (tmp_path / "history.png").read_bytes().startswith(PNG)
    missing = subprocess.run([sys.executable, "-m", "disttrain.report", str(tmp_path / "no")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "history.csv does not exist" in missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_demo_draws_its_figure_on_gcs(gcs):
    """The chief's figure goes through storage: one upload to the emulator, no rename."""
    base = f"gs://{gcs.bucket}/report-demo"
    done = subprocess.run(
        [sys.executable, "-m", "disttrain.demo", "--epochs", "2", "--output-dir", base,
         "--no-tensorboard"], cwd=REPO_ROOT, env=worker_env({"DISTTRAIN_RUN_ID": "r1"}),
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = f"{base}/r1"
    assert storage.read_bytes(f"{run_dir}/history.png").startswith(PNG)
    assert sorted(storage.read_json(f"{run_dir}/history.json")["epochs"]) == ["1", "2"]
    again = subprocess.run([sys.executable, "-m", "disttrain.report", run_dir, "--no-figure"],
                           cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "  epochs        2\n" in again.stdout, again.stderr
