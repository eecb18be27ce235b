"""Tests of `python -m launch.local` with real processes.

Workers are `tests/launch/workers/worker.py` (standard library only, starts in
milliseconds); one slow test runs a real MultiWorkerMirroredStrategy all-reduce.
Every launcher a test starts carries a unique marker in its environment, which
its workers inherit; after each test no process with that marker may be left
(any that is gets SIGKILL by pid and fails the test).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid

import pytest

from disttrain import testing
from disttrain.cluster import PORT_CLASH, Cluster
from launch.output import LineSplitter
from tests.support import REPO_ROOT

WORKER = str(REPO_ROOT / "tests" / "launch" / "workers" / "worker.py")
PY = sys.executable
MARKER_ENV = "DISTTRAIN_LAUNCH_TEST_MARKER"

pytestmark = pytest.mark.timeout(60)


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries this test's marker."""
    return testing.processes_with_env(MARKER_ENV, marker)


def wait_gone(marker: str, within: float) -> list[int]:
    return testing.wait_gone(MARKER_ENV, marker, within)


class Launch:
    """A running `python -m launch.local` whose output can be awaited line by line."""

    def __init__(self, args, env, wrap=()):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*wrap, PY, "-m", "launch.local", *args], cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> list[str]:
        """Reads stdout until `count` lines match `pattern`; returns the matches."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                found = re.findall(pattern, self.out.decode(), re.MULTILINE)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                assert left > 0, f"no {count} x {pattern!r} in stdout: {self.out.decode()}"
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    assert chunk, f"launcher closed stdout early: {self.out.decode()}"
                    self.out += chunk

    def finish(self, timeout: float = 30) -> tuple[int, str, str, float]:
        """Waits for exit; returns (exit code, stdout, stderr, seconds since start)."""
        out, err = self.proc.communicate(timeout=timeout)
        elapsed = time.monotonic() - self.started
        return self.proc.returncode, (self.out + out).decode(), err.decode(), elapsed


@pytest.fixture
def launch():
    """Starts launchers (`launch(*args)`; `wrap=(...)` runs them under a command such as
    `ip netns exec NS`); afterwards, no process of theirs may be left."""
    marker = uuid.uuid4().hex
    launches: list[Launch] = []

    def start(*args: str, env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()
              ) -> Launch:
        base = {k: v for k, v in os.environ.items()
                if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONFAULTHANDLER")}
        launches.append(Launch(args, {**base, MARKER_ENV: marker, **(env or {})}, wrap))
        return launches[-1]

    start.marker = marker
    yield start
    for launched in launches:
        if launched.proc.poll() is None:
            launched.proc.kill()
        launched.proc.communicate()
    survivors = wait_gone(marker, within=5)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes left behind: {survivors}"


def run(launch, *args: str, timeout: float = 30, env=None) -> tuple[int, str, str, float]:
    return launch(*args, env=env).finish(timeout)


def reports(stdout: str) -> list[tuple[str, dict]]:
    """(prefix label, report) for each `[label] REPORT {...}` line."""
    return [(m[1], json.loads(m[2]))
            for m in re.finditer(r"^\[([a-z0-9]+)\] REPORT (.*)$", stdout, re.MULTILINE)]


def worker(*args: str) -> list[str]:
    return ["--", PY, WORKER, *args]


# --- the line splitter, without processes -------------------------------------------------

def test_splitter_joins_partial_lines_and_keeps_empty_lines():
    s = LineSplitter()
    assert s.feed(b"hel", 0) == []
    assert s.feed(b"lo\n\nwor", 0) == [b"hello", b""]
    assert s.feed(b"ld\r\n", 0) == [b"world"]
    assert s.finish() == []
    assert s.feed(b"no newline at the end", 0) == []
    assert s.finish() == [b"no newline at the end"]


def test_splitter_throttles_carriage_return_updates():
    s = LineSplitter(progress_interval=1.0)
    assert s.feed(b"\r10%\r20%\r30%\r", now=0.0) == [b"10%"]
    assert s.next_flush == 1.0
    assert s.flush_due(0.5) == []
    assert s.flush_due(1.0) == [b"30%"]
    assert s.feed(b"40%\r", now=1.2) == []
    assert s.feed(b"100%\n", now=1.3) == [b"100%"], "the final state always shows"
    assert s.feed(b"\r50%\r\n", now=1.4) == [b"50%"], "a new bar starts unthrottled"
    assert s.feed(b"\r60%\r", now=1.5) == [b"60%"]
    assert s.feed(b"\n", now=1.6) == [], "an update already shown is not repeated"


def test_splitter_cuts_endless_lines():
    s = LineSplitter(max_line=4)
    assert s.feed(b"abcdefghij", 0) == [b"abcd", b"efgh"]
    assert s.finish() == [b"ij"]


def test_exit_codes_are_described_by_their_meaning():
    from launch import procs

    assert [procs.describe_exit(c) for c in (0, 1, 70, 75, 137, 143, 200)] == [
        "0", "1", "70 (stuck)", "75 (preempted)", "137 (SIGKILL)", "143 (SIGTERM)", "200"]


def test_port_clash_pattern_matches_what_tensorflow_prints():
    for line in (
        "E0000 00:00:1795376631.581638    3428 add_port.cc:83] Failed to add port to server: "
        "No address added out of total 1 resolved for '0.0.0.0:48151'",
        "tensorflow.python.framework.errors_impl.UnknownError: Could not start gRPC server",
        "OSError: [Errno 98] Address already in use",
    ):
        assert PORT_CLASH.search(line)
    assert not PORT_CLASH.search("ValueError: loss is NaN")


# --- command line -------------------------------------------------------------------------

def test_help_has_examples():
    out = subprocess.run([PY, "-m", "launch.local", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0
    assert "examples:" in out.stdout and "--max-restarts" in out.stdout


def test_launcher_does_not_import_tensorflow():
    out = subprocess.run(
        [PY, "-c", "import sys, launch.local; print('tensorflow' in sys.modules)"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "must be at least 1"),
    (["--workers", "two"], "not a valid int"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["python", "train.py"], "put the command to run after '--'"),
    (["--"], "no command after '--'"),
    (["--", "no-such-command-d1s7"], "'no-such-command-d1s7' not found on PATH"),
    (["--", "./no/such/file"], "is not an executable file"),
    (["--run-id", "bad id"], "not a valid run id"),
    (["--host", "bad host"], "not a valid 'host:port' address"),
    (["--grace", "-1"], "must be at least 0"),
    (["--timeout", "0"], "must be more than 0"),
    (["--threads-per-worker", "-1"], "must be at least 0"),
])
def test_bad_input_exits_2_before_starting_anything(launch, tmp_path, args, message):
    logs = tmp_path / "logs"
    code, out, err, _ = run(launch, "--log-dir", str(logs), *args, timeout=20)
    assert code == 2, err
    assert message in err
    assert "usage:" in err
    assert not logs.exists(), "nothing was set up"


def test_non_executable_command_exits_2(launch, tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("echo hi\n")
    code, _, err, _ = run(launch, "--", str(script))
    assert code == 2 and "is not an executable file" in err


def test_command_that_cannot_be_executed_exits_126(launch, tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("echo no shebang\n")
    script.chmod(0o755)
    code, _, err, _ = run(launch, "--workers", "2", "--", str(script))
    assert code == 126, err
    assert "Exec format error" in err


def test_dry_run_prints_env_and_command_and_starts_nothing(launch, tmp_path):
    touched = tmp_path / "ran"
    code, out, err, _ = run(
        launch, "--workers", "2", "--chief", "--run-id", "dry-1", "--dry-run",
        "--", PY, "-c", f"open({str(touched)!r}, 'w')")
    assert code == 0, err
    assert not touched.exists()
    assert "nothing started" in out
    for label, type_, index in (("chief", "chief", 0), ("w0", "worker", 0), ("w1", "worker", 1)):
        block = out.split(f"\n{label}:\n", 1)[1]
        tf_config = json.loads(re.search(r"TF_CONFIG='(.*)'", block)[1])
        assert tf_config["task"] == {"type": type_, "index": index}
        assert "DISTTRAIN_RUN_ID=dry-1" in block
        assert "DISTTRAIN_ATTEMPT=0" in block
        assert "PYTHONUNBUFFERED=1" in block
        assert f"command: {PY} -c" in block


def test_more_tasks_than_cores_warns(launch):
    cores = os.cpu_count()
    code, out, err, _ = run(launch, "--workers", str(cores), "--evaluator", "--dry-run")
    assert code == 0, err
    assert f"warning: {cores + 1} tasks on {cores} CPU cores" in err


def test_each_task_gets_its_share_of_the_cores_as_thread_pools(launch):
    share = str(max(1, os.cpu_count() // 3))
    code, out, err, _ = run(launch, "--workers", "2", "--evaluator", *worker("report"))
    assert code == 0, err
    got = reports(out)
    assert len(got) == 3, out
    for _, report in got:
        assert [report[k] for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                                    "OMP_NUM_THREADS")] == [share] * 3, report


@pytest.mark.parametrize("flag, user_env, expected", [
    ("3", {"OMP_NUM_THREADS": "7"}, ["3", "3", "7"]),
    ("0", {}, [None, None, None]),
])
def test_threads_per_worker_flag_and_the_users_environment(launch, flag, user_env, expected):
    code, out, err, _ = run(launch, "--workers", "2", "--threads-per-worker", flag,
                            *worker("report"), env=user_env)
    assert code == 0, err
    for _, report in reports(out):
        assert [report[k] for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                                    "OMP_NUM_THREADS")] == expected, report


def test_dry_run_without_command_shows_the_demo(launch):
    code, out, err, _ = run(launch, "--dry-run")
    assert code == 0, err
    assert f"command: {PY} -m disttrain.demo" in out


# --- running ------------------------------------------------------------------------------

def test_success_env_contract_output_routing_logs_and_result(launch, tmp_path):
    logs = tmp_path / "logs"
    code, out, err, _ = run(
        launch, "--workers", "2", "--chief", "--evaluator", "--run-id", "test-run.1",
        "--log-dir", str(logs), *worker("report"))
    assert code == 0, err
    got = reports(out)
    assert sorted(label for label, _ in got) == ["chief", "evaluator", "w0", "w1"]
    clusters = set()
    for label, r in got:
        assert r["label"] == label
        cluster = Cluster.from_tf_config(r["tf_config"], run_id=r["DISTTRAIN_RUN_ID"])
        assert cluster.label == label and cluster.run_id == "test-run.1"
        assert cluster.chief is not None and len(cluster.workers) == 2
        clusters.add(json.dumps(r["tf_config"]["cluster"], sort_keys=True))
        assert r["DISTTRAIN_ATTEMPT"] == "0"
        assert r["DISTTRAIN_RESULT_FILE"] == str(logs / "result.json")
        assert r["PYTHONUNBUFFERED"] == "1"
        assert r["TF_CPP_MIN_LOG_LEVEL"] == "2"
        assert r["PYTHONFAULTHANDLER"] == "1"
    assert len(clusters) == 1, "every task sees the same cluster"
    for label in ("chief", "w0", "w1", "evaluator"):
        assert f"[{label}] stderr line of {label}\n" in err
        assert "stderr line" not in out
        assert "REPORT" not in err
        assert (logs / "attempt-0" / f"{label}.stdout.log").read_text().startswith("REPORT ")
        assert (logs / "attempt-0" / f"{label}.stderr.log").read_text() == (
            f"stderr line of {label}\n")
    assert re.search(r"^\[launch\]\s+w1\s+0\s", err, re.MULTILINE)
    assert re.search(r"^\[launch\]   best_checkpoint  ckpt-7$", err, re.MULTILINE), err
    assert re.search(r"^\[launch\]   written_by       chief$", err, re.MULTILINE), err


def test_user_environment_wins_and_run_id_is_generated(launch):
    code, out, err, _ = run(launch, *worker("report"), env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert code == 0, err
    [(_, r)] = reports(out)
    assert r["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", r["DISTTRAIN_RUN_ID"])
    assert not os.path.exists(r["DISTTRAIN_RESULT_FILE"]), "the temporary result dir is removed"
    assert re.search(r"^\[launch\]   written_by       w0$", err, re.MULTILINE), err


def test_chief_only_output(launch):
    code, out, err, _ = run(launch, "--workers", "2", "--chief", "--chief-only-output",
                            *worker("report"))
    assert code == 0, err
    assert [label for label, _ in reports(out)] == ["chief"]
    assert "[chief] stderr line of chief" in err
    assert "[w0]" not in out + err and "[w1]" not in out + err


def test_worker_exit_code_is_the_launchers_and_others_are_stopped(launch):
    code, out, err, elapsed = run(launch, "--workers", "3", "--grace", "5",
                                  *worker("fail", "w1", "3"))
    assert code == 3, err
    assert elapsed < 5, "others stop on SIGTERM, well within the grace period"
    assert "[w0] got SIGTERM" in out and "[w2] got SIGTERM" in out
    assert "w1 failed first: exited with 3; last lines of its stderr:\n[launch]   | boom" in err
    assert re.search(r"w1\s+3\s+.*root cause", err)
    assert re.search(r"w0\s+143 \(SIGTERM\)\s+.*stopped by launcher", err)


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(launch):
    code, out, err, elapsed = run(launch, "--workers", "2", "--grace", "1",
                                  *worker("fail-stubborn", "w1", "4"))
    assert code == 4, err
    assert 1 <= elapsed < 10
    assert re.search(r"w0\s+137 \(SIGKILL\)\s+.*stopped by launcher", err)


def test_worker_sigkilled_mid_run(launch):
    job = launch("--workers", "2", *worker("wait"))
    pids = dict(job.wait_for(r"^\[(w\d)\] ready pid=(\d+)$", count=2))
    os.kill(int(pids["w1"]), signal.SIGKILL)
    code, out, err, _ = job.finish()
    assert code == 137, err
    assert "[w0] got SIGTERM" in out
    assert "w1 failed first: exited with 137 (SIGKILL)" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_launcher_signal_is_forwarded_as_sigterm(launch, sig):
    job = launch("--workers", "2", "--grace", "5", *worker("wait"))
    job.wait_for(r"^\[w\d\] ready pid=\d+$", count=2)
    os.kill(job.proc.pid, sig)
    code, out, err, _ = job.finish()
    assert code == 128 + sig, err
    assert "[w0] got SIGTERM" in out and "[w1] got SIGTERM" in out
    assert f"got {sig.name}: sending SIGTERM to all workers" in err


def test_launcher_sigkilled_leaves_no_worker_or_child(launch):
    job = launch("--workers", "2", *worker("grandchild"))
    job.wait_for(r"^\[w\d\] ready pid=\d+$", count=2)
    children = [int(p) for p in job.wait_for(r"^\[w\d\] child pid=(\d+)$", count=2)]
    alive = marked_pids(launch.marker)
    assert set(children) <= set(alive) and len(alive) >= 6, "launcher, watchdog, 2+2 workers"
    job.proc.kill()
    job.proc.wait()
    assert wait_gone(launch.marker, within=5) == []


def watchdog_pid(marker: str) -> int:
    [pid] = [p for p in marked_pids(marker)
             if b"watchdog.py" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def test_workers_die_with_the_launcher_even_without_the_watchdog(launch):
    job = launch("--workers", "2", *worker("wait"))
    job.wait_for(r"^\[w\d\] ready pid=\d+$", count=2)
    os.kill(watchdog_pid(launch.marker), signal.SIGKILL)
    job.proc.kill()
    job.proc.wait()
    assert wait_gone(launch.marker, within=5) == [], "PR_SET_PDEATHSIG"


def test_launcher_goes_on_when_its_watchdog_dies(launch):
    job = launch("--workers", "2", *worker("wait"))
    job.wait_for(r"^\[w\d\] ready pid=\d+$", count=2)
    os.kill(watchdog_pid(launch.marker), signal.SIGKILL)
    os.kill(job.proc.pid, signal.SIGINT)
    code, out, err, _ = job.finish()
    assert code == 130, err
    assert "warning: the watchdog" in err
    assert "[w0] got SIGTERM" in out and "[w1] got SIGTERM" in out


def test_child_left_behind_by_a_finished_worker_is_stopped(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("leave-child"))
    assert code == 0, err
    assert "w0 exited but left processes in its group: stopping them" in err


def test_lingering_evaluator_is_stopped_after_training_finishes(launch):
    code, out, err, _ = run(launch, "--workers", "1", "--evaluator", "--grace", "1",
                            *worker("eval-lingers"))
    assert code == 0, err
    assert "training tasks finished: stopping evaluator" in err
    assert "[evaluator] got SIGTERM" in out


def test_max_restarts_restarts_the_group_on_fresh_ports(launch, tmp_path):
    code, out, err, _ = run(launch, "--workers", "2", "--max-restarts", "1",
                            "--log-dir", str(tmp_path), *worker("fail-attempt0", "5"))
    assert code == 0, err
    by_attempt: dict[str, dict[str, dict]] = {}
    for label, r in reports(out):
        by_attempt.setdefault(r["DISTTRAIN_ATTEMPT"], {})[label] = r
    assert sorted(by_attempt) == ["0", "1"]
    assert all(sorted(tasks) == ["w0", "w1"] for tasks in by_attempt.values())
    ports = {a: set(tasks["w0"]["tf_config"]["cluster"]["worker"])
             for a, tasks in by_attempt.items()}
    assert not ports["0"] & ports["1"], "a restart uses fresh ports"
    assert len({r["DISTTRAIN_RUN_ID"] for t in by_attempt.values() for r in t.values()}) == 1
    assert "restarting the group on fresh ports (restart 1/1)" in err
    assert "2 attempt(s) (1 restart(s))" in err
    # Per task: its exit in each earlier attempt (* marks that attempt's root cause), not the
    # job's attempt count repeated on every row.
    header = re.search(r"^\[launch\]   task .*$", err, re.MULTILINE)[0]
    assert header.split() == ["[launch]", "task", "exit", "wall", "earlier", "attempts",
                              "note"], header
    assert re.search(r"^\[launch\]   w0\s+0\s+\S+s\s+143\s*$", err, re.MULTILINE), err
    assert re.search(r"^\[launch\]   w1\s+0\s+\S+s\s+5\*\s*$", err, re.MULTILINE), err
    assert "* root cause of that attempt" in err
    assert (tmp_path / "attempt-0" / "w1.stderr.log").read_text().endswith("boom\n")
    assert (tmp_path / "attempt-1" / "w1.stdout.log").exists()


def test_summary_of_a_single_attempt_has_no_attempts_column(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("report"))
    assert code == 0, err
    header = re.search(r"^\[launch\]   task .*$", err, re.MULTILINE)[0]
    assert header.split() == ["[launch]", "task", "exit", "wall", "note"], header
    assert "1 attempt(s)" in err


def test_evaluator_failure_neither_stops_nor_restarts_training(launch, tmp_path):
    code, out, err, _ = run(launch, "--workers", "2", "--evaluator", "--max-restarts", "1",
                            "--log-dir", str(tmp_path), *worker("eval-fails", "5"))
    assert code == 0, err
    got = reports(out)
    assert sorted(label for label, _ in got) == ["w0", "w1"], "training ran to its end"
    assert {r["DISTTRAIN_ATTEMPT"] for _, r in got} == {"0"}, "and was not restarted"
    assert "got SIGTERM" not in out and "restarting" not in err
    assert "[evaluator] eval boom" in err
    assert ("evaluator exited with 5 after" in err
            and "not a training task: training goes on" in err), err
    assert re.search(r"^\[launch\]   evaluator\s+5\s+.*evaluator failure, ignored$", err,
                     re.MULTILINE), err
    assert ("evaluator failed (ignored: not a training task); last lines of its stderr:\n"
            "[launch]   | eval boom") in err, err
    assert "failed first" not in err and "root cause" not in err
    assert "1 attempt(s)" in err
    assert not (tmp_path / "attempt-1").exists()


def test_evaluator_failure_does_not_hide_a_training_failure(launch):
    code, out, err, _ = run(launch, "--workers", "2", "--evaluator", "--grace", "5",
                            *worker("fail", "w1", "3"))
    assert code == 3, err
    assert "w1 failed first: exited with 3" in err
    assert re.search(r"evaluator\s+143 \(SIGTERM\)\s+.*stopped by launcher", err)


def test_a_training_task_that_exits_0_early_is_named_in_the_failure_report(launch):
    code, out, err, _ = run(launch, "--workers", "3", "--grace", "5",
                            *worker("early-exit", "w0", "1"))
    assert code == 1, "the exit code is still the first non-zero one"
    assert "w0 failed first: exited with 1" in err
    assert re.search(r"note: w1 exited 0 at \d+\.\ds while w0, w2 were still running "
                     r"\(it may have left training early\)", err), err
    assert re.search(r"w0\s+1\s+.*root cause", err)
    assert re.search(r"w1\s+0\s+.*exited 0 while others trained \(see note\)", err)


def test_early_exit_note_with_one_peer_left(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("early-exit", "w0", "1"))
    assert code == 1, err
    assert re.search(r"note: w1 exited 0 at \d+\.\ds while w0 was still running "
                     r"\(it may have left training early\)", err), err


def test_no_early_exit_note_when_nothing_failed(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("report"))
    assert code == 0, err
    assert "left training early" not in err


def test_without_restarts_a_failure_is_final(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("fail-attempt0", "5"))
    assert code == 5, err
    assert {r["DISTTRAIN_ATTEMPT"] for _, r in reports(out)} == {"0"}


def test_no_restart_once_the_job_timeout_has_passed(launch):
    code, out, err, _ = run(launch, "--workers", "2", "--grace", "2", "--timeout", "1",
                            "--max-restarts", "2", *worker("fail-stubborn", "w1", "3"))
    assert code == 3, err
    assert "--timeout 1s has passed: not starting again" in err
    assert "1 attempt(s)" in err


@pytest.mark.parametrize("kind", ["os", "tf"])
def test_port_clash_relaunches_without_using_a_restart(launch, kind):
    code, out, err, _ = run(launch, "--workers", "2", "--max-restarts", "0",
                            *worker("clash-attempt0", kind))
    assert code == 0, err
    attempts = {label: set() for label in ("w0", "w1")}
    for label, r in reports(out):
        attempts[label].add(r["DISTTRAIN_ATTEMPT"])
    assert attempts["w1"] == {"1"} and "1" in attempts["w0"]
    assert "w1 could not bind its port" in err
    assert "not counted as a restart (1/3)" in err


def test_port_clash_relaunches_are_bounded(launch):
    code, out, err, _ = run(launch, "--workers", "2", *worker("always-clash"))
    assert code == 1, err
    assert "(3/3)" in err and "4 attempt(s) (3 port-clash relaunch(es))" in err


def test_concurrent_progress_bars_stay_line_intact(launch):
    n = 1500
    code, out, err, _ = run(launch, "--workers", "2", *worker("progress", str(n)))
    assert code == 0, err
    last, count = {}, {"w0": 0, "w1": 0}
    for line in out.splitlines():
        m = re.fullmatch(r"\[(w\d)\] progress (w\d) (\d+)/(\d+) (#*)", line)
        assert m and m[1] == m[2], f"garbled line: {line!r}"
        step = int(m[3])
        assert len(m[5]) == step % 40 and int(m[4]) == n, f"garbled line: {line!r}"
        assert step > last.get(m[1], 0)
        last[m[1]] = step
        count[m[1]] += 1
    assert last == {"w0": n, "w1": n}
    assert all(3 <= c < 100 for c in count.values()), f"updates are throttled: {count}"


def test_timeout_dumps_python_stacks_then_stops(launch):
    code, out, err, elapsed = run(launch, "--workers", "2", "--timeout", "1.5",
                                  *worker("wait"))
    assert code == 124, err
    assert elapsed < 10
    assert "[launch] timeout after 1.5s: dumping worker stacks" in err
    for label in ("w0", "w1"):
        assert f"[{label}] Fatal Python error: Aborted" in err
        assert re.search(rf'^\[{label}\]   File ".*worker\.py", line \d+ in wait$', err,
                         re.MULTILINE)


def test_startup_timeout_fails_the_attempt_and_can_restart(launch):
    code, out, err, _ = run(launch, "--workers", "2", "--startup-timeout", "1",
                            "--max-restarts", "1", *worker("silent"))
    assert code == 124, err
    assert "startup timeout: w0 wrote no output within 1s: dumping worker stacks" in err
    assert "w0 failed first: wrote no output before the startup timeout" in err
    assert "2 attempt(s) (1 restart(s))" in err


MWMS_PROGRAM = """
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
rank = strategy.cluster_resolver.task_id
value = strategy.run(lambda: tf.constant(float(rank + 1)))
print("ALLREDUCE", float(strategy.reduce("SUM", value, axis=None)))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_multi_worker_mirrored_strategy_all_reduce(launch):
    code, out, err, _ = run(launch, "--workers", "2", "--", PY, "-c", MWMS_PROGRAM,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=240)
    assert code == 0, err
    assert "[w0] ALLREDUCE 3.0" in out and "[w1] ALLREDUCE 3.0" in out
