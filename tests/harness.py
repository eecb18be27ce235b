"""Real localhost multi-worker clusters for tests.

`run_cluster` starts N worker processes on 127.0.0.1 with free ports and a
TF_CONFIG each (built by `launch.tf_config`), runs a function (or a command) in
every one, and returns each worker's exit code, output and structured result.
A cluster that does not finish within `timeout` is killed (every process by its
group id) and the test fails with every worker's output; no process outlives
the call.

Example:

```python
def train(epochs):               # module-level, importable by the workers
    ...
    return {"loss": history["loss"]}

run = run_cluster(train, num_workers=2, kwargs={"epochs": 2})
run.assert_ok()
assert run.results[0] == run.results[1]
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import portpicker

from launch import tf_config
from launch.local import PORT_CLASH

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_RESULT = "DISTTRAIN_TEST_RESULT"


@dataclasses.dataclass
class WorkerResult:
    label: str
    returncode: int | None
    stdout: str
    stderr: str
    result: Any
    seconds: float


@dataclasses.dataclass
class ClusterRun:
    workers: list[WorkerResult]
    timed_out: bool

    @property
    def results(self) -> list[Any]:
        return [w.result for w in self.workers]

    @property
    def returncodes(self) -> list[int | None]:
        return [w.returncode for w in self.workers]

    def report(self) -> str:
        parts = []
        for w in self.workers:
            parts.append(
                f"--- {w.label}: exit {w.returncode} after {w.seconds:.1f}s\n"
                f"stdout (tail):\n{w.stdout[-3000:]}\nstderr (tail):\n{w.stderr[-6000:]}"
            )
        head = "cluster TIMED OUT and was killed\n" if self.timed_out else ""
        return head + "\n".join(parts)

    def assert_ok(self) -> "ClusterRun":
        if self.timed_out or any(rc != 0 for rc in self.returncodes):
            raise AssertionError(f"cluster failed: exit codes {self.returncodes}\n{self.report()}")
        return self


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every test worker starts from: quiet TF, repo importable."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def function_command(fn: Callable[..., Any], kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The command that runs module-level `fn(**kwargs)` in a worker process."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    return [sys.executable, "-m", "tests._worker", target, json.dumps(kwargs or {})]


def run_cluster(
    target: Callable[..., Any] | Sequence[str],
    num_workers: int = 2,
    *,
    kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    per_worker_env: Callable[[int], Mapping[str, str]] | None = None,
    chief: bool = False,
    timeout: float = 240.0,
    cwd: str | os.PathLike[str] | None = None,
    wrap: Callable[[int, list[str]], list[str]] | None = None,
) -> ClusterRun:
    """Runs `target` on a fresh localhost cluster of `num_workers` worker tasks.

    Args:
        target: a module-level function (its JSON-serialisable return value becomes
            the worker's `result`) or a command list.
        num_workers: number of `worker` tasks.
        kwargs: keyword arguments for a function target.
        env: extra environment for every worker.
        per_worker_env: extra environment per task, given the task's rank.
        chief: add a separate `chief` task (rank 0).
        timeout: seconds for the whole cluster before it is killed.
        cwd: working directory of the workers.
        wrap: given a task's rank and command, returns the command to run instead
            (e.g. to run it in a mount namespace with a read-only view).
    """
    for _ in range(3):
        run = _run_once(target, num_workers, kwargs, env, per_worker_env, chief, timeout, cwd,
                        wrap)
        clashed = any(PORT_CLASH.search(w.stderr) for w in run.workers)
        if not clashed:
            return run
    return run


def _run_once(target, num_workers, kwargs, env, per_worker_env, chief, timeout, cwd,
              wrap) -> ClusterRun:
    count = num_workers + (1 if chief else 0)
    ports = [portpicker.pick_unused_port() for _ in range(count)]
    addresses = tf_config.local_addresses(ports)
    specs = tf_config.cluster_specs(addresses[1:] if chief else addresses,
                                    chief=addresses[0] if chief else None)
    command = list(target) if not callable(target) else function_command(target, kwargs)
    with tempfile.TemporaryDirectory(prefix="disttrain-cluster-") as tmp:
        procs = []
        started = time.monotonic()
        try:
            for rank, spec in enumerate(specs):
                out = open(Path(tmp, f"{rank}.out"), "w+")
                err = open(Path(tmp, f"{rank}.err"), "w+")
                extra = {"TF_CONFIG": spec.to_json(), ENV_RESULT: str(Path(tmp, f"{rank}.json"))}
                extra.update(env or {})
                extra.update(per_worker_env(rank) if per_worker_env else {})
                proc = subprocess.Popen(
                    wrap(rank, command) if wrap else command, env=worker_env(extra), stdout=out, stderr=err,
                    cwd=cwd or REPO_ROOT, start_new_session=True,
                )
                procs.append((spec, proc, out, err))
            ended, timed_out = _wait_all([p for _, p, _, _ in procs], started + timeout)
        finally:
            for _, proc, _, _ in procs:
                _kill_group(proc)
        workers = []
        for rank, (spec, proc, out, err) in enumerate(procs):
            out.seek(0)
            err.seek(0)
            result_path = Path(tmp, f"{rank}.json")
            result = json.loads(result_path.read_text()) if result_path.exists() else None
            workers.append(WorkerResult(spec.label, proc.returncode, out.read(), err.read(),
                                        result, ended.get(rank, time.monotonic()) - started))
            out.close()
            err.close()
    return ClusterRun(workers, timed_out)


MARKER_ENV = "DISTTRAIN_TEST_JOB_MARKER"


@dataclasses.dataclass
class LaunchedJob:
    """What one `python -m launch.local` job left: its exit, output and survivors.

    Attributes:
        returncode: the launcher's exit code (None when it was killed on timeout).
        stdout: the launcher's stdout (the workers' prefixed stdout).
        stderr: the launcher's stderr (the workers' prefixed stderr and its messages).
        seconds: wall time until the launcher exited.
        timed_out: True when it ran past the timeout and was killed.
        survivors: processes of the job still alive after it ended (then SIGKILLed).
    """

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    survivors: list[int]

    def report(self) -> str:
        head = "launcher TIMED OUT and was killed\n" if self.timed_out else ""
        return (f"{head}exit {self.returncode} after {self.seconds:.1f}s, survivors "
                f"{self.survivors}\nstdout (tail):\n{self.stdout[-3000:]}\n"
                f"stderr (tail):\n{self.stderr[-8000:]}")


def run_launcher(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> LaunchedJob:
    """Runs `python -m launch.local ARGS` to the end; no process of the job outlives the call.

    Every process of the job carries a unique marker in its environment; after
    the launcher exits (or is killed at `timeout`, or the caller is interrupted,
    e.g. by pytest-timeout), the processes still carrying it get 5 seconds to
    go, then SIGKILL, and are listed in `survivors`.

    Args:
        args: the launcher's arguments, e.g. `["--workers", "2", "--", *command]`.
        timeout: seconds before the launcher's whole process group is killed.
        cwd: working directory (default: the repository root).
        env: extra environment for the launcher and so for every worker.
        wrap: given the launcher's command, returns the command to run instead
            (e.g. to run the whole job in a mount namespace).
    """
    marker = secrets.token_hex(8)
    command = [sys.executable, "-m", "launch.local", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        wrap(command) if wrap else command, cwd=cwd or REPO_ROOT,
        env=worker_env({**(env or {}), MARKER_ENV: marker}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        survivors = wait_gone(MARKER_ENV, marker, within=5)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return LaunchedJob(None if timed_out else proc.returncode, out, err, seconds, timed_out,
                       survivors)


def read_only_view(path: str | os.PathLike[str], command: list[str]) -> list[str]:
    """Wraps `command` to run in a private mount namespace where `path` is read-only.

    Any write under `path` then fails with EROFS, even as root: a proof that the
    process wrote nothing there. Needs root and util-linux `unshare`.
    """
    quoted = " ".join(shlex.quote(c) for c in command)
    p = shlex.quote(str(path))
    script = f"mount --bind {p} {p} && mount -o remount,bind,ro {p} && exec {quoted}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def can_make_read_only_views() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount --bind / / 2>/dev/null"], capture_output=True
    ) if os.geteuid() == 0 and shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds `name=value`.

    Children inherit the environment, so a unique marker given to a launcher
    finds every process of its job, in any mount namespace.
    """
    needle = f"{name}={value}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_gone(name: str, value: str, within: float) -> list[int]:
    """Waits up to `within` seconds for `processes_with_env(name, value)` to end; the rest."""
    deadline = time.monotonic() + within
    while (pids := processes_with_env(name, value)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> tuple[dict[int, float], bool]:
    """Waits for every process; returns when each ended and whether time ran out."""
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.monotonic()
        if time.monotonic() > deadline:
            return ended, True
        time.sleep(0.05)
    return ended, False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
