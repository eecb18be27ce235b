"""The default job: `python -m disttrain.demo` alone and `python -m launch.local --workers 2`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from disttrain.testing import worker_env
from launch import noise
from tests.support import REPO_ROOT


def _run(args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=worker_env(env), text=True,
                          capture_output=True, timeout=timeout)


def _summary(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(?:\[w0\] )?  (\w+) +(.+)$", text, re.MULTILINE))


@pytest.mark.timeout(300)
def test_demo_single_process(tmp_path):
    proc = _run(["-m", "disttrain.demo", "--epochs", "2", "--output-dir", str(tmp_path),
                 "--no-tensorboard"], REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert summary["workers"] == "1" and summary["epochs_run"] == "2"
    out = tmp_path / summary["run_id"]
    manifest = json.loads((out / "checkpoints" / "best.json").read_text())
    assert manifest["path"] == summary["best_checkpoint"]
    assert (out / "history.csv").read_text().count("\n") == 3
    assert (out / "history.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "backup").exists(), "the backup is removed after a normal end"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launch_local_default_job_on_two_workers(tmp_path):
    """At the TensorFlow log level the launcher sets: no start-up lines, one progress bar,
    and the figure the summary names."""
    proc = _run(["-m", "launch.local", "--workers", "2"], tmp_path, timeout=360,
                env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = _summary(proc.stdout)
    assert summary["workers"] == "2"
    assert float(summary["best_val_accuracy"]) > 0.9
    assert "[w1]" not in proc.stdout, "only the chief prints"
    shown = re.findall(r"^\[w\d\] (.*)$", proc.stderr, re.MULTILINE)
    assert not [line for line in shown if noise.is_known_harmless(line)], proc.stderr
    assert re.search(r"^\[launch\]   best_checkpoint  .*\.keras$", proc.stderr, re.MULTILINE)
    run_dir = tmp_path / "disttrain-demo" / summary["run_id"]
    assert (run_dir / "checkpoints" / "best.json").exists()
    assert (run_dir / "tensorboard").is_dir()
    figure = re.search(r"^\[launch\]   figure +(.*)$", proc.stderr, re.MULTILINE)
    assert figure and figure[1] == f"disttrain-demo/{summary['run_id']}/history.png", proc.stderr
    assert (tmp_path / figure[1]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_four_workers(tmp_path):
    proc = _run(["-m", "launch.local", "--workers", "4", "--", sys.executable, "-m",
                 "disttrain.demo", "--epochs", "3", "--output-dir", str(tmp_path)],
                tmp_path, timeout=360)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = _summary(proc.stdout)
    assert (summary["workers"], summary["epochs_run"]) == ("4", "3")
    assert len(list((tmp_path / summary["run_id"] / "checkpoints").glob("*.keras"))) == 3


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--learning-rate", "-1"], "must be positive"),
])
def test_demo_bad_arguments(tmp_path, args, message):
    proc = _run(["-m", "disttrain.demo", *args], tmp_path, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
