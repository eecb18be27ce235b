"""`disttrain.testing`: a hang fails the run and leaves no process behind; bad targets are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from disttrain.testing import ClusterTestError, function_command, processes_with_env, run_cluster
from tests.coordination import coordination_workloads as work
from tests.support import REPO_ROOT


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_a_hanging_cluster_times_out_and_every_process_is_killed(tmp_path):
    started = time.monotonic()
    run = run_cluster(work.hang_with_child, 2, timeout=8,
                      env={"DISTTRAIN_HARNESS_MARK": str(tmp_path)})
    assert run.timed_out and time.monotonic() - started < 30
    with pytest.raises(AssertionError, match="TIMED OUT"):
        run.assert_ok()
    assert all(rc is not None for rc in run.returncodes)
    left = [pid for pid in processes_with_env("DISTTRAIN_HARNESS_MARK", str(tmp_path))
            if _alive(pid)]
    assert left == [], "workers or their children were left behind"


def test_a_function_command_runs_from_any_working_directory(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "doubling.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(source))
    import doubling

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = tmp_path / "result.json"
    done = subprocess.run(function_command(doubling.double, {"x": 21}), cwd=elsewhere,
                          env={"DISTTRAIN_TEST_RESULT": str(result)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(result.read_text()) == 42


def test_functions_a_worker_cannot_import_are_refused():
    def nested():
        return None

    for fn in (nested, lambda: None):
        with pytest.raises(ClusterTestError, match="define it at the top level"):
            function_command(fn)


def test_importing_disttrain_testing_does_not_import_tensorflow():
    code = "import sys, disttrain.testing; assert 'tensorflow' not in sys.modules, 'tensorflow'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
