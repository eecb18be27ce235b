"""Runs one attempt of a worker group and tears the whole group down together.

Every worker starts in its own session (so its process group holds it and all
its children) with PR_SET_PDEATHSIG=SIGKILL, and its group is registered with a
`Watchdog` process, so nothing outlives the launcher even if the launcher is
SIGKILLed. One thread does everything: a selector loop reads all worker pipes,
notices exits (pidfds where the OS has them, else a 0.1 s tick), catches the
launcher's signals and enforces deadlines. Because only this loop writes to the
console, lines of different workers never interleave.

Teardown is always the same: SIGTERM to each worker's process group, `grace`
seconds, then SIGKILL. The first training task (essential worker) that exits
non-zero on its own is the root cause; workers that die after the launcher
signalled them are not. A non-essential worker (the evaluator) that fails is
recorded and reported, but training goes on: it neither stops the others nor
fails the attempt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from disttrain.errors import PREEMPTED_EXIT_CODE, STALLED_EXIT_CODE
from launch.output import Console, OutputStream

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TICK_S = 0.1
DUMP_WAIT_S = 3.0
DRAIN_WAIT_S = 2.0

OK = "ok"
FAILED = "failed"
SIGNALLED = "signalled"
TIMEOUT = "timeout"
STARTUP_TIMEOUT = "startup-timeout"

_WATCHDOG_PATH = str(pathlib.Path(__file__).with_name("watchdog.py"))
_PR_SET_PDEATHSIG = 1

if sys.platform.startswith("linux"):
    import ctypes
    import resource

    _LIBC = ctypes.CDLL(None, use_errno=True)
else:
    _LIBC = None


def exit_code(returncode: int) -> int:
    """A shell-style exit code: a death by signal N becomes 128+N."""
    return returncode if returncode >= 0 else 128 - returncode


def describe_exit(code: int) -> str:
    """`3`, `137 (SIGKILL)` for a death by signal, `75 (preempted)`, `70 (stuck)`."""
    if code == PREEMPTED_EXIT_CODE:
        return f"{code} (preempted)"
    if code == STALLED_EXIT_CODE:
        return f"{code} (stuck)"
    if code > 128:
        try:
            return f"{code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return str(code)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One process of the group.

    Attributes:
        label: short name used in prefixes and file names (`w0`, `chief`).
        argv: the command.
        env: the complete environment of the process.
        essential: True for training tasks. A non-essential worker (the
            evaluator) is given `grace` seconds to exit once all essential ones
            have succeeded, then stopped without failing the attempt; if it
            fails on its own, that is recorded (`Outcome.side_failures`) and
            training goes on.
        show_output: False to keep its lines off the console (logs still get them).
    """

    label: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    essential: bool = True
    show_output: bool = True


@dataclasses.dataclass(frozen=True)
class GroupOptions:
    """How one attempt is supervised.

    Attributes:
        grace: seconds between SIGTERM and SIGKILL.
        job_started: `time.monotonic()` when the whole job began.
        timeout: seconds the whole job may run (counted from `job_started`), or None.
        startup_timeout: seconds each worker has to write its first byte of
            output (stdout or stderr), or None.
        log_dir: directory for `<label>.stdout.log` / `<label>.stderr.log`, or None.
        watch: pattern looked for in each worker's stderr lines (see `WorkerResult.watch_hit`).
        hide: says which lines of any worker to keep off the console (they still
            reach the logs and the stderr tail; see `WorkerResult.hidden_lines`).
    """

    grace: float
    job_started: float
    timeout: float | None = None
    startup_timeout: float | None = None
    log_dir: pathlib.Path | None = None
    watch: re.Pattern[str] | None = None
    hide: Callable[[str], bool] | None = None


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    label: str
    exit_code: int
    wall_s: float
    stopped: bool
    """The launcher signalled the worker before it exited."""
    stderr_tail: tuple[str, ...]
    watch_hit: str | None
    """The first stderr line matching `GroupOptions.watch`, if any."""
    hidden_lines: int = 0
    """Lines kept off the console by `GroupOptions.hide`."""


@dataclasses.dataclass(frozen=True)
class EarlyExit:
    """A training task that exited 0 while other training tasks were still running.

    Under MultiWorkerMirroredStrategy that usually means it left training early
    (its `fit` returned), and its peers then fail in their next collective: the
    first of them to fail is reported as the root cause, but this one is why.
    """

    label: str
    at_s: float
    """Seconds after the task started."""
    still_running: tuple[str, ...]
    """Labels of the training tasks that were still running then."""

    def describe(self) -> str:
        verb = "was" if len(self.still_running) == 1 else "were"
        return (f"{self.label} exited 0 at {self.at_s:.1f}s while "
                f"{', '.join(self.still_running)} {verb} still running "
                "(it may have left training early)")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an attempt ended.

    Attributes:
        reason: OK, FAILED (a worker exited non-zero on its own), SIGNALLED (the
            launcher got a signal), TIMEOUT (the job timeout) or STARTUP_TIMEOUT.
        results: one per worker, in spec order.
        culprit: label of the root-cause worker for FAILED and STARTUP_TIMEOUT.
        signum: the launcher's signal for SIGNALLED.
        side_failures: labels of non-essential workers (the evaluator) that
            exited non-zero on their own; they did not affect `reason`.
        early_exits: training tasks that exited 0 while other training tasks
            were still running, before anything failed, in the order they exited.
    """

    reason: str
    results: tuple[WorkerResult, ...]
    culprit: str | None = None
    signum: int | None = None
    side_failures: tuple[str, ...] = ()
    early_exits: tuple[EarlyExit, ...] = ()

    def result(self, label: str) -> WorkerResult:
        return next(r for r in self.results if r.label == label)


class StartError(Exception):
    """A worker's command could not be started."""


class SignalInbox:
    """While entered, SIGINT/SIGTERM/SIGHUP to the launcher are queued, not fatal.

    The signal numbers arrive through `signal.set_wakeup_fd` on a socket that a
    selector can wait on, so a signal wakes the supervisor loop at once.
    """

    def __enter__(self) -> "SignalInbox":
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._send.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, _ignore_signal) for s in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_fd)
        self._recv.close()
        self._send.close()

    def fileno(self) -> int:
        return self._recv.fileno()

    def take(self) -> list[int]:
        """Signals received since the last call, oldest first."""
        received = b""
        while True:
            try:
                chunk = self._recv.recv(64)
            except BlockingIOError:
                return list(received)
            received += chunk


def _ignore_signal(signum: int, frame: object) -> None:
    """Replaces the default action; `SignalInbox` reads the signal from its wakeup fd."""


class Watchdog:
    """A helper process that SIGKILLs every registered group if the launcher dies, then runs
    the commands given to `on_death`."""

    def __init__(self, console: Console):
        self._console = console
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _WATCHDOG_PATH], bufsize=0,
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
        )

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def on_death(self, commands: Sequence[Sequence[str]]) -> None:
        """Sets the commands the watchdog runs if the launcher dies (replacing any set before;
        an empty list clears them), after killing the groups."""
        self._send(f"*{json.dumps([list(argv) for argv in commands])}\n")

    def close(self) -> None:
        if not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _send(self, message: str) -> None:
        if self._proc.stdin.closed:
            return
        try:
            self._proc.stdin.write(message.encode())
        except BrokenPipeError:
            self._console.info(
                f"warning: the watchdog (pid {self._proc.pid}) died; if the launcher is "
                "killed, children of workers may survive it")
            self._proc.stdin.close()


def _die_with_launcher(launcher_pid: int):
    """preexec_fn: SIGKILL this child when the launcher's main thread dies."""

    def setup() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int] | None:
    """Pids of the group's processes that have not exited (zombies do not count).

    A zombie stays in its group until its parent reaps it, and an orphan's new
    parent may take its time (or, as a container's PID 1, never do it). None
    where there is no /proc to read.
    """
    if _LIBC is None:
        return None
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state, _, group = f.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disable_core_dumps(pgid: int) -> None:
    """Sets RLIMIT_CORE=0 on every process of a group, before a SIGABRT for stacks."""
    for pid in _group_members(pgid) or ():
        try:
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        except OSError:
            continue


class _Worker:
    def __init__(self, spec: WorkerSpec, proc: subprocess.Popen, started: float,
                 stdout: OutputStream, stderr: OutputStream):
        self.spec = spec
        self.proc = proc
        self.started = started
        self.stderr = stderr
        self.streams = (stdout, stderr)
        self.pipes = {proc.stdout.fileno(): (proc.stdout, stdout),
                      proc.stderr.fileno(): (proc.stderr, stderr)}
        self.ended: float | None = None
        self.code: int | None = None
        self.first_output: float | None = None
        self.signalled = False
        self.term_sent = False
        self.kill_at: float | None = None
        self.group_gone = False
        self.pidfd: int | None = None

    @property
    def pgid(self) -> int:
        return self.proc.pid


def run_group(specs: Sequence[WorkerSpec], options: GroupOptions, console: Console,
              watchdog: Watchdog, signals: SignalInbox) -> Outcome:
    """Starts every worker, supervises them to the end and returns how it went.

    Returns only once every process of every worker's group is gone.

    Raises:
        StartError: a worker could not be started (the ones already started are killed).
    """
    return _Group(specs, options, console, watchdog, signals).run()


class _Group:
    def __init__(self, specs: Sequence[WorkerSpec], options: GroupOptions, console: Console,
                 watchdog: Watchdog, signals: SignalInbox):
        self._specs = specs
        self._opt = options
        self._console = console
        self._watchdog = watchdog
        self._signals = signals
        self._sel = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._reason: str | None = None
        self._culprit: str | None = None
        self._signum: int | None = None
        self._stopping = False
        self._dump_until: float | None = None
        self._finish_at: float | None = None
        self._preempted_at: float | None = None
        self._drain_until: float | None = None
        self._side_failures: list[str] = []
        self._early_exits: list[EarlyExit] = []

    def run(self) -> Outcome:
        self._sel.register(self._signals, selectors.EVENT_READ)
        try:
            for spec in self._specs:
                self._start(spec)
            while not self._finished():
                self._step()
        finally:
            self._cleanup()
        return Outcome(
            reason=self._reason or OK,
            results=tuple(self._result(w) for w in self._workers),
            culprit=self._culprit,
            signum=self._signum,
            side_failures=tuple(self._side_failures),
            early_exits=tuple(self._early_exits),
        )

    def _start(self, spec: WorkerSpec) -> None:
        logs = {}
        if self._opt.log_dir is not None:
            self._opt.log_dir.mkdir(parents=True, exist_ok=True)
            logs = {name: open(self._opt.log_dir / f"{spec.label}.{name}.log", "wb")
                    for name in ("stdout", "stderr")}
        try:
            proc = subprocess.Popen(
                spec.argv, env=dict(spec.env), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                start_new_session=True,
                preexec_fn=None if _LIBC is None else _die_with_launcher(os.getpid()),
            )
        except OSError as e:
            for log in logs.values():
                log.close()
            raise StartError(f"cannot start {spec.label}: {e}") from e
        self._watchdog.watch(proc.pid)
        stdout, stderr = (
            OutputStream(self._console, name, spec.label, visible=spec.show_output,
                         log=logs.get(name), watch=watch, hide=self._opt.hide)
            for name, watch in (("stdout", None), ("stderr", self._opt.watch)))
        worker = _Worker(spec, proc, time.monotonic(), stdout, stderr)
        self._workers.append(worker)
        for fd in worker.pipes:
            self._sel.register(fd, selectors.EVENT_READ, worker)
        if hasattr(os, "pidfd_open"):
            worker.pidfd = os.pidfd_open(proc.pid)
            self._sel.register(worker.pidfd, selectors.EVENT_READ)

    def _step(self) -> None:
        for key, _ in self._sel.select(TICK_S):
            if key.fileobj is self._signals:
                for signum in self._signals.take():
                    self._on_signal(signum)
            elif key.data is not None:
                self._read(key.data, key.fd)
        now = time.monotonic()
        for w in self._workers:
            for _, stream in w.pipes.values():
                stream.flush_due(now)
        self._reap(now)
        self._check_timeouts(now)
        self._advance(now)

    def _read(self, worker: _Worker, fd: int) -> None:
        data = os.read(fd, 65536)
        now = time.monotonic()
        if data:
            if worker.first_output is None:
                worker.first_output = now
            worker.pipes[fd][1].feed(data, now)
        else:
            self._close_pipe(worker, fd)

    def _close_pipe(self, worker: _Worker, fd: int) -> None:
        self._sel.unregister(fd)
        pipe, stream = worker.pipes.pop(fd)
        stream.close()
        pipe.close()

    def _close_pidfd(self, worker: _Worker) -> None:
        if worker.pidfd is not None:
            self._sel.unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None

    def _reap(self, now: float) -> None:
        for w in self._workers:
            if w.ended is not None or w.proc.poll() is None:
                continue
            w.ended, w.code = now, exit_code(w.proc.returncode)
            self._close_pidfd(w)
            if w.signalled:
                continue
            if w.code != 0 and not w.spec.essential:
                self._side_failures.append(w.spec.label)
                self._console.info(
                    f"{w.spec.label} exited with {describe_exit(w.code)} after "
                    f"{now - w.started:.1f}s; it is not a training task: training goes on, "
                    "and this neither restarts the job nor sets its exit code")
            elif w.code == PREEMPTED_EXIT_CODE and self._reason is None:
                self._reason, self._culprit = FAILED, w.spec.label
                self._preempted_at = now
                self._console.info(
                    f"{w.spec.label} was preempted (exit {w.code}) after "
                    f"{now - w.started:.1f}s: the others save the same backup and exit too; "
                    f"they get {self._opt.grace:g}s before SIGTERM")
            elif w.code != 0 and self._reason is None:
                self._reason, self._culprit = FAILED, w.spec.label
                self._console.info(
                    f"{w.spec.label} exited with {describe_exit(w.code)} after "
                    f"{now - w.started:.1f}s: stopping the others (grace {self._opt.grace:g}s)")
                self._stop_all(now)
            elif w.code == 0 and w.spec.essential and self._reason is None:
                # poll(), not `ended`: a peer reaped later in this same loop has exited too.
                running = tuple(o.spec.label for o in self._workers
                                if o.spec.essential and o.ended is None and o.proc.poll() is None)
                if running:
                    self._early_exits.append(EarlyExit(w.spec.label, now - w.started, running))

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._stopping:
            self._console.info(f"got {name} while stopping: killing all workers now")
            for w in self._workers:
                w.kill_at = now
            return
        if self._reason is None:
            self._reason, self._signum = SIGNALLED, signum
        self._console.info(
            f"got {name}: sending SIGTERM to all workers, SIGKILL after "
            f"{self._opt.grace:g}s (send it again to kill now)")
        self._stop_all(now)

    def _check_timeouts(self, now: float) -> None:
        if self._reason is not None:
            return
        timeout = self._opt.timeout
        if timeout is not None and now - self._opt.job_started >= timeout:
            self._reason = TIMEOUT
            self._dump_stacks(now, f"timeout after {timeout:g}s")
            return
        startup = self._opt.startup_timeout
        if startup is None:
            return
        for w in self._workers:
            if w.first_output is None and w.ended is None and now - w.started >= startup:
                self._reason, self._culprit = STARTUP_TIMEOUT, w.spec.label
                self._dump_stacks(
                    now, f"startup timeout: {w.spec.label} wrote no output within {startup:g}s")
                return

    def _dump_stacks(self, now: float, why: str) -> None:
        """SIGABRT makes Python's faulthandler (PYTHONFAULTHANDLER=1) print all thread stacks."""
        self._console.info(f"{why}: dumping worker stacks")
        self._stopping = True
        for w in self._workers:
            if w.group_gone:
                continue
            if w.ended is None:
                w.signalled = True
            _disable_core_dumps(w.pgid)
            _signal_group(w.pgid, signal.SIGABRT)
        self._dump_until = now + DUMP_WAIT_S

    def _advance(self, now: float) -> None:
        running = [w for w in self._workers if w.ended is None]
        if self._preempted_at is not None and not self._stopping and (
                not running or now >= self._preempted_at + self._opt.grace):
            self._stop_all(now)
        if self._dump_until is not None and (not running or now >= self._dump_until):
            self._dump_until = None
            self._stop_all(now)
        if self._reason is None and not self._stopping and running:
            if all(w.ended is not None and w.code == 0
                   for w in self._workers if w.spec.essential):
                if self._finish_at is None:
                    self._finish_at = now + self._opt.grace
                elif now >= self._finish_at:
                    labels = ", ".join(w.spec.label for w in running)
                    self._console.info(f"training tasks finished: stopping {labels}")
                    self._stop_all(now)
        for w in self._workers:
            if w.group_gone:
                continue
            if w.kill_at is not None and now >= w.kill_at:
                w.kill_at = None
                _signal_group(w.pgid, signal.SIGKILL)
            if w.ended is not None and not _group_alive(w.pgid):
                w.group_gone = True
                self._watchdog.forget(w.pgid)
        if not running and self._dump_until is None:
            for w in self._workers:
                if not w.group_gone and not w.term_sent:
                    self._console.info(
                        f"{w.spec.label} exited but left processes in its group: stopping them")
                    self._stop([w], now)

    def _stop(self, workers: Sequence[_Worker], now: float) -> None:
        for w in workers:
            if w.term_sent or w.group_gone:
                continue
            w.term_sent = True
            if w.ended is None:
                w.signalled = True
            _signal_group(w.pgid, signal.SIGTERM)
            w.kill_at = now + self._opt.grace

    def _stop_all(self, now: float) -> None:
        self._stopping = True
        self._stop(self._workers, now)

    def _finished(self) -> bool:
        if not all(w.ended is not None and w.group_gone for w in self._workers):
            return False
        if not any(w.pipes for w in self._workers):
            return True
        now = time.monotonic()
        if self._drain_until is None:
            self._drain_until = now + DRAIN_WAIT_S
        return now >= self._drain_until

    def _cleanup(self) -> None:
        for w in self._workers:
            if not w.group_gone:
                _signal_group(w.pgid, signal.SIGKILL)
                self._watchdog.forget(w.pgid)
                w.group_gone = True
            if w.ended is None:
                w.proc.kill()
                w.proc.wait()
                w.ended, w.code = time.monotonic(), exit_code(w.proc.returncode)
            for fd in list(w.pipes):
                self._close_pipe(w, fd)
            self._close_pidfd(w)
        self._sel.close()

    def _result(self, w: _Worker) -> WorkerResult:
        return WorkerResult(
            label=w.spec.label,
            exit_code=w.code,
            wall_s=w.ended - w.started,
            stopped=w.signalled,
            stderr_tail=tuple(w.stderr.tail),
            watch_hit=w.stderr.watch_hit,
            hidden_lines=sum(stream.hidden for stream in w.streams),
        )
