"""Coordination and the strategy factory on real localhost clusters, and on one process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from disttrain.cluster import Cluster
from disttrain.coordination import Coordinator, InProcessTransport, PeerLostError, Transport
from disttrain.errors import CallbackConfigError, CoordinationError
from disttrain.testing import run_cluster, worker_env
from tests.coordination import coordination_workloads as work
from tests.support import REPO_ROOT

pytestmark = pytest.mark.timeout(300)


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, text=True,
                          capture_output=True, env=worker_env(env), timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [4, 8])
def test_every_primitive_agrees_on_a_real_cluster(num_workers):
    run = run_cluster(work.exchanges, num_workers, timeout=240).assert_ok()
    _assert_every_primitive_agreed(run.results)


def _assert_every_primitive_agreed(results: list[dict]) -> None:
    n = len(results)
    for r in results:
        assert (r["num_workers"], r["any"], r["all"], r["all_true"]) == (n, True, False, True)
        assert r["gather"] == [f"value-{rank}" for rank in range(n)]
        assert r["broadcast"] == "from-0"
        assert r["chief_result"] == {"rank": 0}
        assert r["run_id"] == results[0]["run_id"]
        assert r["error"] == "StorageError: t.error failed on w1: ValueError: disk full"
        assert r["chief_error"] == "t.chief failed on w0: ZeroDivisionError: division by zero"
        # Finished blocks of exchange keys are deleted; the current block's keys stay.
        assert r["stored_keys"] == [[False] * n, [False] * n, [True] * n]


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
        assert facts["fixes"] == ["gradients_reduced_before_apply", "multi_worker_atomic_saves",
                                  "multi_worker_cpu_without_xla",
                                  "multi_worker_steps_per_execution", "persistent_epoch_iterator",
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


# The protocol over an in-process transport: ranks simulated in threads, no cluster.


def _on_simulated_ranks(fn, num_workers: int,
                        transport: InProcessTransport | list[Transport] | None = None,
                        timeout: float = 60.0) -> list:
    """Runs `fn(coordinator)` on `num_workers` ranks, one thread each, sharing one
    in-process store (or each using its own view of one, from a list); returns each
    rank's result (or the exception it raised)."""
    transport = transport or InProcessTransport(num_workers)
    views = transport if isinstance(transport, list) else [transport] * num_workers
    workers = tuple(f"127.0.0.1:{2000 + rank}" for rank in range(num_workers))
    results: list = [None] * num_workers

    def run(rank: int) -> None:
        coord = Coordinator(Cluster(task_index=rank, workers=workers), timeout=timeout,
                            transport=views[rank])
        try:
            results[rank] = fn(coord)
        except Exception as e:  # noqa: BLE001 - the error is the result
            results[rank] = e

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(num_workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    assert not any(thread.is_alive() for thread in threads), "a simulated rank hung"
    return results


def test_every_primitive_agrees_on_three_simulated_ranks():
    _assert_every_primitive_agreed(_on_simulated_ranks(work.exchanges_over, 3))


def test_simulated_ranks_at_different_call_sites_fail_with_both_names():
    for r in _on_simulated_ranks(work.diverge_over, 2):
        assert "workers diverged" in r["error"]
        assert "'t.left'" in r["error"] and "'t.right'" in r["error"]


def test_an_error_on_one_simulated_rank_is_raised_on_every_rank_as_its_class():
    def fail_on_rank_2(coord):
        bad = CallbackConfigError("monitor='val_acc' is not logged") if coord.rank == 2 else None
        coord.raise_if_any("t.config", bad)

    for rank, error in enumerate(_on_simulated_ranks(fail_on_rank_2, 3)):
        assert type(error) is CallbackConfigError
        assert str(error) == ("t.config failed on w2: CallbackConfigError: "
                              "monitor='val_acc' is not logged")
        assert (error.__cause__ is not None) == (rank == 2)


def test_a_simulated_rank_that_never_comes_times_out_with_its_name():
    def only_rank_0_votes(coord):
        if coord.rank == 1:
            return None
        start = time.monotonic()
        try:
            coord.any(False, "t.vote", timeout=1)
        except CoordinationError as e:
            return str(e), time.monotonic() - start
        return None, time.monotonic() - start

    message, seconds = _on_simulated_ranks(only_rank_0_votes, 2)[0]
    assert "timed out at 't.vote' waiting for w1" in message
    assert "within 1s" in message
    assert 0.9 < seconds < 3


def test_a_peer_the_transport_lost_is_named_with_the_exchange():
    class PeerGone(InProcessTransport):
        def check_peer(self, rank: int, wait: float) -> None:
            raise PeerLostError(rank, ConnectionError("socket closed\nmore detail"))

    def only_rank_0_votes(coord):
        return coord.any(False, "t.vote") if coord.rank == 0 else None

    error = _on_simulated_ranks(only_rank_0_votes, 2, transport=PeerGone(2))[0]
    assert type(error) is CoordinationError
    assert str(error).startswith("lost w1 at 't.vote': ConnectionError: socket closed. ")
    assert isinstance(error.__cause__, ConnectionError)


def test_events_and_statuses_on_simulated_ranks():
    def announce(coord):
        first = coord.post("request", coord._label(coord.rank))
        coord.post(f"ack/{coord.rank}", str(10 + coord.rank))
        acks = coord.collect("ack", timeout=10)
        coord.set_status(f"status-{coord.rank}")
        coord.set_status(f"latest-{coord.rank}")
        coord.barrier("t.statuses_set")
        return first, coord.poll("request"), acks, coord.statuses()

    results = _on_simulated_ranks(announce, 3)
    assert sum(first for first, *_ in results) == 1
    winner = next(label for (first, label, *_) in results if first)
    for _, requester, acks, statuses in results:
        assert requester == winner
        assert acks == ["10", "11", "12"]
        assert statuses == ["latest-0", "latest-1", "latest-2"]


class _CountingTransport(InProcessTransport):
    """The in-process store, counting each thread's writes and the keys it read."""

    def __init__(self, num_workers: int):
        super().__init__(num_workers)
        self.writes: dict[str, int] = {}
        self.keys_read: dict[str, set[str]] = {}
        self._count_lock = threading.Lock()

    def set(self, key: str, value: str) -> bool:
        with self._count_lock:
            name = threading.current_thread().name
            self.writes[name] = self.writes.get(name, 0) + 1
        return super().set(key, value)

    def get(self, key: str, wait: float) -> str | None:
        with self._count_lock:
            self.keys_read.setdefault(threading.current_thread().name, set()).add(key)
        return super().get(key, wait)


@pytest.mark.parametrize("num_workers", [2, 8])
def test_a_worker_makes_one_write_and_reads_one_key_per_exchange_whatever_the_size(num_workers):
    votes = 20
    transport = _CountingTransport(num_workers)

    def vote(coord):
        threading.current_thread().name = f"rank-{coord.rank}"
        return [coord.any(coord.rank == num_workers - 1 and i == 7, f"t.vote-{i}")
                for i in range(votes)]

    results = _on_simulated_ranks(vote, num_workers, transport=transport)
    assert all(r == [i == 7 for i in range(votes)] for r in results)
    for rank in range(1, num_workers):
        assert transport.writes[f"rank-{rank}"] == votes
        assert len(transport.keys_read[f"rank-{rank}"]) == votes
    assert transport.writes["rank-0"] == 2 * votes, "its own entry and the combined one"
    assert len(transport.keys_read["rank-0"]) == votes * (num_workers - 1)


class _RankView(Transport):
    """One simulated rank's view of a shared in-process store, counting that rank's
    calls (from any of its threads): writes, deletes and the keys it read."""

    def __init__(self, shared: InProcessTransport):
        self.shared = shared
        self.num_workers = shared.num_workers
        self.writes = self.deletes = 0
        self.keys_read: set[str] = set()

    def set(self, key: str, value: str) -> bool:
        self.writes += 1
        return self.shared.set(key, value)

    def get(self, key: str, wait: float) -> str | None:
        self.keys_read.add(key.removeprefix("disttrain/event/"))
        return self.shared.get(key, wait)

    def delete(self, key: str) -> None:
        self.deletes += 1
        self.shared.delete(key)

    def check_peer(self, rank: int, wait: float) -> None:
        self.shared.check_peer(rank, wait)


def _rank_views(num_workers: int, shared: InProcessTransport | None = None) -> list[_RankView]:
    shared = shared or InProcessTransport(num_workers)
    return [_RankView(shared) for _ in range(num_workers)]


@pytest.mark.parametrize("num_workers", [2, 8])
def test_the_stall_watch_reads_one_status_per_look_on_all_but_the_chief(num_workers):
    """Every simulated rank watches this test's main thread, which waits in `join`
    (elsewhere) far past the 0.4 s bound: the chief reads every status and republishes
    them in its own; each other rank reads the chief's status only."""
    from disttrain.coordination.liveness import ELSEWHERE, StallWatch

    views = _rank_views(num_workers)

    def watch(coord):
        stall_watch = StallWatch(coord, interval=0.05).start()
        time.sleep(1.0)
        stall_watch.stop()
        return stall_watch._posts

    looks = _on_simulated_ranks(watch, num_workers, transport=views, timeout=0.4)
    chief = json.loads(views[0].shared.get("disttrain/event/status/0", 0))
    assert [p["state"] for p in chief["peers"]] == [ELSEWHERE] * num_workers
    assert views[0].keys_read == {f"status/{rank}" for rank in range(1, num_workers)}
    for rank in range(num_workers):
        assert looks[rank] >= 10
        assert views[rank].writes == views[rank].deletes == looks[rank], "one line per look"
    for rank in range(1, num_workers):
        assert views[rank].keys_read == {"status/0"}


def _preempted_training(requester: int, dead: int | None = None):
    """A simulated rank's training loop with a PreemptionWatch: `requester` is signalled
    after step 5; rank `dead` never trains. Returns the step it stopped at (or its error)."""
    from disttrain.resume.preemption import PreemptionWatch

    def train(coord):
        if coord.rank == dead:
            return None
        preemption = PreemptionWatch(coord).start()
        try:
            for step in range(1, 5000):
                time.sleep(0.002)
                if coord.rank == requester and step == 5:
                    preemption._on_signal(signal.SIGTERM, None)
                if preemption.step_done(step):
                    return step
        finally:
            preemption.stop()
        return None

    return train


@pytest.mark.filterwarnings("ignore:disttrain. fit.. runs outside the main thread")
@pytest.mark.parametrize("num_workers", [2, 8])
def test_a_preemption_costs_all_but_the_chief_one_write_and_two_keys_read(num_workers):
    views = _rank_views(num_workers)
    stopped = _on_simulated_ranks(_preempted_training(requester=num_workers - 1), num_workers,
                                  transport=views, timeout=10)
    assert len(set(stopped)) == 1 and stopped[0] > 5, f"one agreed step: {stopped}"
    acks = {f"preemption/ack/{rank}" for rank in range(num_workers)}
    assert views[0].keys_read == {"preemption/request", "preemption/stop_step"} | acks
    for rank in range(1, num_workers):
        assert views[rank].keys_read == {"preemption/request", "preemption/stop_step"}
        assert views[rank].writes == 1 + (rank == num_workers - 1), "its ack (and the request)"


@pytest.mark.filterwarnings("ignore:disttrain. fit.. runs outside the main thread")
@pytest.mark.parametrize("dead", [0, 2])
def test_a_preemption_names_a_lost_peer_on_every_rank_even_the_chief(dead):
    class Lost(InProcessTransport):
        def check_peer(self, rank: int, wait: float) -> None:
            if rank == dead:
                raise PeerLostError(rank, ConnectionError("socket closed"))

    results = _on_simulated_ranks(_preempted_training(requester=1, dead=dead), 3,
                                  transport=Lost(3), timeout=10)
    for rank, error in enumerate(results):
        if rank != dead:
            assert type(error) is CoordinationError, results
            assert str(error).startswith(f"lost w{dead} at 'preemption/"), error
