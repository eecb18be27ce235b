"""The cluster harness itself: a hang fails the run and leaves no process behind."""

from __future__ import annotations

import time

import pytest

from tests import coordination_workloads as work
from tests.harness import processes_with_env, run_cluster


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
