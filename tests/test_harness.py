"""The cluster harness itself: a hang fails the run and leaves no process behind."""

from __future__ import annotations

import os
import time

import pytest

from tests import coordination_workloads as work
from tests.harness import run_cluster


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
    assert _pids_of_marked_processes() == [], "workers or their children were left behind"


def _pids_of_marked_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if b"DISTTRAIN_HARNESS_MARK=" in environ and _alive(int(entry)):
            found.append(int(entry))
    return found
