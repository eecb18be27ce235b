"""Run code on N real local workers, for tests of multi-worker training code.

`run_cluster` starts a fresh cluster of worker processes on 127.0.0.1 (free
ports, one TF_CONFIG each, built by `disttrain.cluster.build_tf_config`), runs a function or a
command in every one, and returns each worker's exit code, output and result.
A cluster that does not finish within `timeout` is killed, every process of
it by its process group, so no worker (and no child of a worker) outlives the
call. A run that lost a race for a port ("address already in use") is started
again with new ports, up to three times.

`run_launcher` runs a whole `python -m launch.local` job instead (restarts,
output prefixes, exit codes included) and finds every process the job left
by an environment marker that children inherit; none outlives the call.

A function target must be importable by its module name (defined at the top
level of a module, not in `__main__`): each worker runs
`python -m disttrain.testing MODULE:FUNCTION KWARGS_JSON`, which imports it,
calls it with the JSON keyword arguments and hands its JSON-serialisable return
value back as the worker's `result`.

Importing this module does not import TensorFlow; the workers do.

Example, a test of your own callback on two workers:

```python
# my_project/workloads.py
def train(epochs):
    import disttrain, keras
    strategy = disttrain.strategy()
    with strategy.scope():
        model = build_model()
    history = model.fit(dataset(), epochs=epochs, callbacks=[MyCallback()])
    return {"loss": history.history["loss"]}

# tests/test_my_callback.py
from disttrain.testing import run_cluster
from my_project import workloads

def test_my_callback_agrees_on_every_worker():
    run = run_cluster(workloads.train, num_workers=2, kwargs={"epochs": 2}, timeout=120)
    run.assert_ok()
    assert run.results[0] == run.results[1]
```
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


from disttrain.cluster import PORT_CLASH, Cluster, build_tf_config, free_ports
from disttrain.errors import DisttrainError

ENV_RESULT = "DISTTRAIN_TEST_RESULT"
"""Environment variable naming the file where a function worker writes its result."""

PORT_CLASH_RETRIES = 3
MARKER_ENV = "DISTTRAIN_TEST_JOB_MARKER"
"""Environment variable carrying the unique marker of a `run_launcher` job."""


class ClusterTestError(DisttrainError, ValueError):
    """A test cluster was asked to run something its workers cannot import."""


@dataclasses.dataclass
class WorkerResult:
    """What one worker of a `run_cluster` call left.

    Attributes:
        label: the task's label, e.g. `"w0"` (or `"chief"`).
        returncode: the process's exit code (negative: killed by that signal).
        stdout: everything the worker wrote to stdout.
        stderr: everything the worker wrote to stderr.
        result: a function worker's return value (None for a command, or when
            the function did not return).
        seconds: wall time from the cluster's start until this worker ended.
    """

    label: str
    returncode: int | None
    stdout: str
    stderr: str
    result: Any
    seconds: float


@dataclasses.dataclass
class ClusterRun:
    """What a `run_cluster` call left: every worker's result, in task order.

    Attributes:
        workers: one `WorkerResult` per task (rank order).
        timed_out: True when the cluster ran past its timeout and was killed.
    """

    workers: list[WorkerResult]
    timed_out: bool

    @property
    def results(self) -> list[Any]:
        """Each worker's `result`, in rank order."""
        return [w.result for w in self.workers]

    @property
    def returncodes(self) -> list[int | None]:
        """Each worker's exit code, in rank order."""
        return [w.returncode for w in self.workers]

    def report(self) -> str:
        """Every worker's exit code, time and the tails of its output, for a failure message."""
        parts = []
        for w in self.workers:
            parts.append(
                f"--- {w.label}: exit {w.returncode} after {w.seconds:.1f}s\n"
                f"stdout (tail):\n{w.stdout[-3000:]}\nstderr (tail):\n{w.stderr[-6000:]}"
            )
        head = "cluster TIMED OUT and was killed\n" if self.timed_out else ""
        return head + "\n".join(parts)

    def assert_ok(self) -> "ClusterRun":
        """Returns self when every worker exited 0 in time; raises AssertionError with
        `report()` otherwise (so a failing test shows every worker's output)."""
        if self.timed_out or any(rc != 0 for rc in self.returncodes):
            raise AssertionError(f"cluster failed: exit codes {self.returncodes}\n{self.report()}")
        return self


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a test worker starts from.

    This process's environment without TF_CONFIG, with TensorFlow's C++ log
    quiet, unbuffered Python output, and the current working directory first on
    PYTHONPATH (so the workers import what this process imports from there).

    Args:
        extra: variables to set on top.

    Example:

    ```python
    env = worker_env({"DISTTRAIN_RUN_ID": "test-run"})
    subprocess.run(function_command(workloads.train, {"epochs": 1}), env=env, check=True)
    ```
    """
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def function_command(fn: Callable[..., Any], kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The command that runs module-level `fn(**kwargs)` in a new process.

    The process imports `fn` by its module name (the directory that module was
    imported from goes first on its `sys.path`) and, when `DISTTRAIN_TEST_RESULT`
    names a file, writes `fn`'s JSON-serialisable return value there.

    Args:
        fn: a function defined at the top level of an importable module.
        kwargs: JSON-serialisable keyword arguments.

    Returns:
        An argv list, e.g. to run under `python -m launch.local ... -- <argv>`.

    Raises:
        ClusterTestError: `fn` is nested, a lambda, or defined in `__main__`.

    Example:

    ```python
    command = ["python", "-m", "launch.local", "--workers", "2", "--",
               *function_command(workloads.train, {"epochs": 1})]
    ```
    """
    module = sys.modules.get(fn.__module__)
    if fn.__module__ == "__main__" or "<" in fn.__qualname__ or module is None:
        raise ClusterTestError(
            f"cannot run {fn.__module__}.{fn.__qualname__} in a worker process: it must be "
            "importable by its module name; define it at the top level of a module other "
            "than the script being run (__main__)")
    command = [sys.executable, "-m", "disttrain.testing"]
    root = _import_root(module)
    if root is not None:
        command += ["--path", root]
    return [*command, f"{fn.__module__}:{fn.__qualname__}", json.dumps(kwargs or {})]


def _import_root(module: Any) -> str | None:
    """The sys.path entry `module` was imported from (None for a module without a file)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    root = Path(file).resolve().parent
    levels = module.__name__.count(".") + (Path(file).stem == "__init__")
    for _ in range(levels):
        root = root.parent
    return str(root)


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

    Every task gets its TF_CONFIG (worker 0 is the chief unless `chief` adds a
    separate chief task), the environment of `worker_env`, and its own session
    (process group). The call returns when every task has ended or `timeout`
    has passed; then every process of the cluster is killed.

    Args:
        target: a module-level function (see `function_command`; its
            JSON-serialisable return value becomes the worker's `result`) or a
            command list (e.g. `["python", "train.py", "--epochs", "1"]`).
        num_workers: number of `worker` tasks.
        kwargs: keyword arguments for a function target.
        env: extra environment for every worker.
        per_worker_env: extra environment per task, given the task's rank.
        chief: add a separate `chief` task (rank 0).
        timeout: seconds for the whole cluster before it is killed.
        cwd: working directory of the workers (default: the current one).
        wrap: given a task's rank and command, returns the command to run instead
            (e.g. to run it in a mount namespace).

    Returns:
        A `ClusterRun`; call `.assert_ok()` to fail a test on any nonzero exit or
        timeout with every worker's output.

    Example:

    ```python
    run = run_cluster(["python", "train.py", "--epochs", "1"], num_workers=3, timeout=300)
    run.assert_ok()
    assert "Epoch 1/1" in run.workers[0].stdout
    ```
    """
    command = function_command(target, kwargs) if callable(target) else list(target)
    for _ in range(PORT_CLASH_RETRIES):
        run = _run_once(command, num_workers, env, per_worker_env, chief, timeout, cwd, wrap)
        if not any(PORT_CLASH.search(w.stderr) for w in run.workers):
            return run
    return run


def _run_once(command, num_workers, env, per_worker_env, chief, timeout, cwd,
              wrap) -> ClusterRun:
    count = num_workers + (1 if chief else 0)
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    workers, chief_address = (addresses[1:], addresses[0]) if chief else (addresses, None)
    configs = ([build_tf_config(workers, "chief", 0, chief_address)] if chief else []) + [
        build_tf_config(workers, "worker", i, chief_address) for i in range(len(workers))]
    with tempfile.TemporaryDirectory(prefix="disttrain-cluster-") as tmp:
        procs = []
        started = time.monotonic()
        try:
            for rank, config in enumerate(configs):
                out = open(Path(tmp, f"{rank}.out"), "w+")
                err = open(Path(tmp, f"{rank}.err"), "w+")
                extra = {"TF_CONFIG": json.dumps(config), ENV_RESULT: str(Path(tmp, f"{rank}.json"))}
                extra.update(env or {})
                extra.update(per_worker_env(rank) if per_worker_env else {})
                proc = subprocess.Popen(
                    wrap(rank, command) if wrap else command, env=worker_env(extra), stdout=out,
                    stderr=err, cwd=cwd, start_new_session=True,
                )
                procs.append((Cluster.from_tf_config(config).label, proc, out, err))
            ended, timed_out = _wait_all([p for _, p, _, _ in procs], started + timeout)
        finally:
            for _, proc, _, _ in procs:
                kill_group(proc)
        workers = []
        for rank, (label, proc, out, err) in enumerate(procs):
            out.seek(0)
            err.seek(0)
            result_path = Path(tmp, f"{rank}.json")
            result = json.loads(result_path.read_text()) if result_path.exists() else None
            workers.append(WorkerResult(label, proc.returncode, out.read(), err.read(),
                                        result, ended.get(rank, time.monotonic()) - started))
            out.close()
            err.close()
    return ClusterRun(workers, timed_out)


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


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs the process group of `proc` (started with `start_new_session=True`) and
    reaps `proc`: the process and every child it started in its session end.

    Example:

    ```python
    proc = subprocess.Popen(command, start_new_session=True)
    try:
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    ```
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
        """Exit, time, survivors and the tails of the output, for a failure message."""
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
        cwd: working directory (default: the current one).
        env: extra environment for the launcher and so for every worker.
        wrap: given the launcher's command, returns the command to run instead
            (e.g. to run the whole job in a mount namespace).

    Returns:
        A `LaunchedJob`.

    Example:

    ```python
    job = run_launcher(["--workers", "2", "--max-restarts", "1", "--",
                        "python", "train.py"], timeout=300)
    assert job.returncode == 0 and job.survivors == [], job.report()
    ```
    """
    marker = secrets.token_hex(8)
    command = [sys.executable, "-m", "launch.local", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        wrap(command) if wrap else command, cwd=cwd,
        env=worker_env({**(env or {}), MARKER_ENV: marker}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            kill_group(proc)
        survivors = wait_gone(MARKER_ENV, marker, within=5)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return LaunchedJob(None if timed_out else proc.returncode, out, err, seconds, timed_out,
                       survivors)


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


def _main(argv: Sequence[str] | None = None) -> None:
    """A function worker: imports MODULE:FUNCTION, calls it, writes its result."""
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.testing",
        description="Call a module-level function with JSON keyword arguments; write its "
                    f"JSON result to the file named by {ENV_RESULT}, when set.")
    parser.add_argument("--path", help="directory to put first on sys.path")
    parser.add_argument("target", help="MODULE:FUNCTION")
    parser.add_argument("kwargs", nargs="?", default="{}", help="keyword arguments as JSON")
    args = parser.parse_args(argv)
    if args.path:
        sys.path.insert(0, args.path)
    module_name, _, qualname = args.target.partition(":")
    fn = importlib.import_module(module_name)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    write_result(fn(**json.loads(args.kwargs)))


def write_result(result: Any) -> None:
    """Writes a function worker's JSON-serialisable `result` to the file `DISTTRAIN_TEST_RESULT`
    names (atomically: a worker killed while writing leaves the previous result); does nothing
    when it is not set. `python -m disttrain.testing` calls it with the function's return
    value; a worker may call it before, to leave a partial result should it not return.

    Example:

    ```python
    write_result({"cases_done": 1})  # what the test reads if the worker dies from here on
    ```
    """
    path = os.environ.get(ENV_RESULT)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)


if __name__ == "__main__":
    _main()
