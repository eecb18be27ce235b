"""Coordination and the strategy factory on real localhost clusters, and on one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import coordination_workloads as work
from tests.harness import REPO_ROOT, run_cluster, worker_env

pytestmark = pytest.mark.timeout(300)


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, text=True,
                          capture_output=True, env=worker_env(env), timeout=120)


@pytest.mark.slow
def test_every_primitive_agrees_on_three_workers():
    run = run_cluster(work.exchanges, 3).assert_ok()
    results = run.results
    for r in results:
        assert (r["num_workers"], r["any"], r["all"], r["all_true"]) == (3, True, False, True)
        assert r["gather"] == ["value-0", "value-1", "value-2"]
        assert r["broadcast"] == "from-0"
        assert r["chief_result"] == {"rank": 0}
        assert r["run_id"] == results[0]["run_id"]
        assert r["error"] == "StorageError: t.error failed on w1: ValueError: disk full"
        assert r["chief_error"] == "t.chief failed on w0: ZeroDivisionError: division by zero"
        # Finished blocks of exchange keys are deleted; the current block's keys stay.
        assert r["stored_keys"] == [[False] * 3, [False] * 3, [True] * 3]


@pytest.mark.slow
@pytest.mark.parametrize("exit_rank", [0, 1])
def test_a_peer_that_exits_is_reported_within_seconds(exit_rank):
    run = run_cluster(work.peer_exits, 2, kwargs={"exit_rank": exit_rank}, timeout=120)
    survivor = run.workers[1 - exit_rank]
    assert run.workers[exit_rank].returncode == 7
    assert survivor.returncode == 0, run.report()
    result = survivor.result
    assert result["error"] is not None and f"lost w{exit_rank}" in result["error"]
    assert result["seconds"] < 15


@pytest.mark.slow
def test_workers_at_different_call_sites_fail_with_both_names():
    run = run_cluster(work.diverge, 2, timeout=120).assert_ok()
    for r in run.results:
        assert "workers diverged" in r["error"]
        assert "'t.left'" in r["error"] and "'t.right'" in r["error"]


@pytest.mark.slow
def test_a_live_but_stuck_peer_times_out():
    run = run_cluster(work.stuck_peer, 2, timeout=120).assert_ok()
    result = run.results[0]
    assert "timed out at 't.vote' waiting for w1" in result["error"]
    assert "within 2s" in result["error"]
    assert 1.5 < result["seconds"] < 6


def test_single_worker_needs_no_tensorflow():
    proc = _python(
        "import sys, json; from disttrain import coordination as c; k = c.get(); "
        "r = [k.any(True, 'a'), k.all(False, 'b'), k.gather('g', 'x'), k.broadcast('v', 'b'), "
        "len(k.run_id()) > 10]; k.barrier('z'); "
        "print(json.dumps([r, 'tensorflow' in sys.modules]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[True, False, ["x"], "v", True], False]


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_bad_timeout_environment_variable(value):
    proc = _python("from disttrain import coordination; coordination.get()",
                   {"DISTTRAIN_COORDINATION_TIMEOUT": value})
    assert proc.returncode != 0
    assert f"DISTTRAIN_COORDINATION_TIMEOUT={value!r}" in proc.stderr


@pytest.mark.slow
def test_strategy_is_created_once_with_fixes_applied():
    run = run_cluster(work.strategy_facts, 2).assert_ok()
    for facts in run.results:
        assert facts["type"] == "CollectiveAllReduceStrategy"
        assert facts["same_object"] and facts["replicas"] == 2
        assert facts["fixes"] == ["multi_worker_steps_per_execution", "persistent_epoch_iterator",
                                  "scalar_metric_reduction", "symbolic_build_local_batch",
                                  "synced_batchnorm_statistics"]
        assert "already created" in facts["different_options"]


def test_strategy_single_process_and_evaluator_use_the_default_strategy():
    code = ("import disttrain, tensorflow as tf; s = disttrain.strategy(); "
            "print(s is tf.distribute.get_strategy(), s is disttrain.strategy())")
    assert _python(code).stdout.split() == ["True", "True"]
    evaluator = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                            "task": {"type": "evaluator", "index": 0}})
    assert _python(code, {"TF_CONFIG": evaluator}).stdout.split() == ["True", "True"]


@pytest.mark.parametrize("call, message", [
    ("disttrain.strategy(implementation='mpi')", "implementation='mpi' is not supported"),
    ("disttrain.strategy(timeout_seconds=0)", "timeout_seconds=0 must be a positive"),
])
def test_strategy_bad_options(call, message):
    proc = _python(f"import disttrain; {call}")
    assert proc.returncode != 0 and message in proc.stderr


def test_strategy_rejects_malformed_tf_config_before_tensorflow_sees_it():
    proc = _python("import disttrain; disttrain.strategy()",
                   {"TF_CONFIG": '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker"}}'})
    assert proc.returncode != 0
    assert "ClusterConfigError: TF_CONFIG task.index=None: missing" in proc.stderr


def test_strategy_names_the_address_it_cannot_listen_on():
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        proc = _python("import disttrain; disttrain.strategy()", {"TF_CONFIG": json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:1"]},
            "task": {"type": "worker", "index": 0}})})
    finally:
        held.close()
    assert proc.returncode != 0
    assert (f"StrategyError: w0 could not listen on its TF_CONFIG address 127.0.0.1:{port} "
            "(TensorFlow: Could not start gRPC server)") in proc.stderr, proc.stderr[-3000:]
    assert "Fix: give this task a free port" in proc.stderr


def test_single_worker_events_need_no_tensorflow():
    proc = _python(
        "import sys, json; from disttrain import coordination as c; k = c.get(); "
        "r = [k.poll('e'), k.post('e', 'a'), k.post('e', 'b'), k.poll('e', wait=1.0), "
        "k.post('ack/0', '7'), k.collect('ack'), k.statuses()]; k.set_status('x'); "
        "print(json.dumps([r, 'tensorflow' in sys.modules]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[None, True, False, "a", True, ["7"], [None]], False]
