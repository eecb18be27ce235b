"""No hangs: a dead, frozen or stuck peer fails the whole job within a bound, named."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from disttrain.testing import run_cluster
from tests.coordination import coordination_workloads as work

pytestmark = pytest.mark.timeout(300)


def test_where_classifies_the_innermost_frame():
    from disttrain.coordination import liveness

    def busy(started, done):
        started.append(True)  # a C call: no Python frame of its own to be sampled in
        while not done:
            time.sleep(0.01)

    started, done = [], []
    thread = threading.Thread(target=busy, args=(started, done))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.001)
        state, place = liveness.where(sys._current_frames()[thread.ident])
    finally:
        done.append(True)
        thread.join()
    assert state == liveness.ELSEWHERE
    assert place.startswith(__file__) and place.endswith("in busy")


def test_a_thread_waiting_in_an_exchange_is_in_exchange():
    """Rank 0 waits in a gather for rank 1 (simulated ranks sharing one in-process store):
    the watch sees it in an exchange, not stuck elsewhere; after the exchange, elsewhere."""
    from disttrain.coordination import liveness
    from disttrain.cluster import Cluster
    from disttrain.coordination import Coordinator, InProcessTransport

    transport = InProcessTransport(num_workers=2)
    workers = ("127.0.0.1:2000", "127.0.0.1:2001")
    coords = [Coordinator(Cluster(task_index=rank, workers=workers), timeout=30,
                          transport=transport) for rank in range(2)]
    thread = threading.Thread(target=coords[0].gather, args=("liveness.test", "0"))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not coords[0].is_waiting(thread) and time.monotonic() < deadline:
            time.sleep(0.001)
        state, _ = liveness.where(sys._current_frames()[thread.ident],
                                  coords[0].is_waiting(thread))
        assert state == liveness.IN_EXCHANGE
        assert not coords[1].is_waiting(threading.current_thread())
    finally:
        coords[1].gather("liveness.test", "1")
        thread.join(10)
    assert not coords[0].is_waiting(thread), "the wait ended with the exchange"

@pytest.mark.slow
def test_a_live_peer_stuck_in_a_callback_is_named_and_everyone_fails():
    """Bound: DISTTRAIN_COORDINATION_TIMEOUT (6 s here) plus a few looks (1.5 s each)."""
    run = run_cluster(work.stalled_peer, 2, kwargs={"how": "loop"},
                      env={"DISTTRAIN_COORDINATION_TIMEOUT": "6"}, timeout=120)
    assert not run.timed_out, run.report()
    stuck, waiting = run.workers[1], run.workers[0]
    assert stuck.returncode == 70, run.report()
    assert "coordination_workloads.py" in stuck.stderr and "in on_train_batch_end" in \
        stuck.stderr.splitlines()[-1], "its last line says where it is stuck"
    assert "Main thread, most recent call last" in stuck.stderr
    error = waiting.result["error"]
    assert error is not None and ("task:1" in error or "w1 has been at" in error), error
    assert waiting.result["seconds"] < 45, "failed within the bound, not at the harness timeout"


@pytest.mark.slow
def test_a_frozen_peer_is_reported_by_the_heartbeat_naming_its_task():
    """The frozen worker is SIGKILLed 30 s after it froze; the chief fails well before."""
    run = run_cluster(work.stalled_peer, 2, kwargs={"how": "sigstop"}, timeout=120)
    assert not run.timed_out, run.report()
    error = run.workers[0].result["error"]
    assert error is not None and "/job:worker/replica:0/task:1" in error, error
    assert "stopped sending heartbeats" in error
    assert run.workers[0].result["seconds"] < 28, "the heartbeat, not the later kill"


@pytest.mark.slow
def test_sigterm_terminates_a_worker_again():
    """TensorFlow's coordination agent makes MWMS workers ignore SIGTERM; strategy() undoes it."""
    run = run_cluster(work.sigterm_self, 2, timeout=120)
    assert not run.timed_out, run.report()
    assert run.workers[1].returncode in (-15, 143), run.report()
    assert run.workers[1].seconds < 15, "died of the signal, not after the 20 s sleep"
