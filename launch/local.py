"""`python -m launch.local`: run a multi-worker TensorFlow job on this machine.

Starts one process per task (workers, optionally a separate chief and an
evaluator), each with its own TF_CONFIG on a free localhost port, prefixes and
routes their output, and treats the training tasks as one job: the first
failure of a training task stops everyone and decides the exit code, a restart
restarts everyone on fresh ports. The evaluator is not part of training: its
failure is reported, nothing more.
See `python -m launch.local --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence


from disttrain.cluster import (
    ENV_ATTEMPT,
    ENV_RESULT_FILE,
    ENV_RUN_ID,
    ENV_TF_CONFIG,
    PORT_CLASH,
    free_ports,
    new_run_id,
    parse_address,
    validate_run_id,
)
from disttrain.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_TIMEOUT,
    ClusterConfigError,
    FirewallUnavailable,
)
from disttrain.report import step_timing
from launch import firewall, noise, procs
from launch.cli import split_command
from launch.output import Console
from launch.tf_config import TaskSpec, cluster_specs, local_addresses

DEFAULT_COMMAND = (sys.executable, "-m", "disttrain.demo")
MAX_PORT_CLASH_RELAUNCHES = 3


# Set for every worker unless the user's environment already sets them.
DEFAULT_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONFAULTHANDLER": "1"}

# TensorFlow's thread pools (read at start-up) and OpenMP's; by default each
# process sizes them to every core of the machine.
THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def threads_per_task(num_tasks: int) -> int:
    """Each task's share of this machine's cores (at least 1): the default of
    `--threads-per-worker`, as torchrun caps OMP_NUM_THREADS: TensorFlow processes
    sized to every core compete for the cores (docs/benchmarks.md, rows "compute
    alone")."""
    return max(1, (os.cpu_count() or 1) // num_tasks)


def thread_env(threads: int) -> dict[str, str]:
    """The environment additions that cap a task's thread pools at `threads`
    (none for 0); variables the user's environment sets are left alone."""
    if threads == 0:
        return {}
    return {name: str(threads) for name in THREAD_ENV if name not in os.environ}


EPILOG = """\
examples:
  python -m launch.local --workers 2
      the bundled demo (python -m disttrain.demo) on 2 workers
  python -m launch.local --workers 4 -- python train.py --epochs 50
  python -m launch.local --workers 2 --chief --evaluator --log-dir logs -- python train.py
  python -m launch.local --workers 2 --max-restarts 3 --timeout 3600 -- python train.py
  python -m launch.local --workers 2 --dry-run -- python train.py
  python -m launch.local --workers 2 --listen-all -- python train.py
      the same, with the workers' ports open to other hosts

each task's environment gets:
  TF_CONFIG                its cluster and task (free ports on --host, fresh on every attempt)
  DISTTRAIN_RUN_ID         the same for every task and attempt
  DISTTRAIN_ATTEMPT        0, then 1, 2, ... when the group is started again
  DISTTRAIN_RESULT_FILE    where the chief may write a JSON result; shown at the end
  DISTTRAIN_TIMING_FILE    where the task's step timing goes (disttrain.strategy() records
                           it); summarised at the end, a straggler named
  PYTHONUNBUFFERED=1, and unless already set TF_CPP_MIN_LOG_LEVEL=2, PYTHONFAULTHANDLER=1
  TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS, OMP_NUM_THREADS
                           unless already set: --threads-per-worker (default: the CPU cores
                           divided by the number of tasks; 0 leaves them unset)

output: every line is prefixed with its task ([w0], [w1], [chief], [evaluator]);
workers' stdout goes to stdout, their stderr and the launcher's messages to stderr.
A progress bar redrawn with carriage returns shows as at most one line per second.
TensorFlow's known-harmless start-up lines (launch/noise.py: absl's "All log
messages before absl::InitializeLog()", "Could not find cuda drivers", cuInit's
"UNKNOWN ERROR (303)" on a machine without a GPU driver, ...) are hidden and
counted in the summary; every other line shows. --show-all shows them too;
--log-dir keeps everything, and a failing task's stderr tail includes them.

other hosts: TensorFlow's gRPC server has no authentication (whoever connects to a
worker's port can run code in it) and listens on every interface, whatever --host
says. Run as root, the launcher adds iptables/ip6tables rules (a chain DISTTRAIN-<pid>,
deleted at the end, or by the watchdog if the launcher is killed) that reset
connections to the job's ports not arriving through loopback: the tasks, on this
machine, still reach each other, and outbound traffic (gs://, downloads) is
untouched. Where it cannot (not root, no iptables), it says so once per run, with
the fix. --listen-all leaves the ports open (a worker on another host).

exit code: 0 on success; the exit code of the training task (chief or worker)
that failed first (128+N if signal N killed it); 128+N when the launcher gets
signal N (SIGINT, SIGTERM, SIGHUP are passed on to the tasks as SIGTERM); 124
on --timeout or --startup-timeout; 126 when the command cannot be executed; 2
for invalid arguments.

preemption: a training script using disttrain.callbacks.BackupAndRestore
answers SIGTERM on any one worker by saving a backup at a step all workers
agree on and exiting with 75 on every worker. The launcher then gives the
other tasks --grace seconds to exit by themselves (no SIGTERM meanwhile), and
with --max-restarts the next attempt resumes from that backup. SIGTERM sent to
the launcher reaches every task the same way (pass a --grace long enough to
finish a step and write the backup).

the evaluator (--evaluator) is not a training task: when it fails, its failure
is reported (and marked in the summary) but training goes on; it never stops
the training tasks, triggers a restart or decides the exit code. Once training
has succeeded, an evaluator still running gets --grace seconds, then SIGTERM.

failure report: the task that failed first is named with the tail of its
stderr. A training task that exited 0 while others were still training is
noted too: its peers then fail in their next collective, so it may be the
real cause.

summary: per task its exit code and wall time in the last attempt; after
restarts also its exit code in each earlier attempt (* marks the root cause).
For tasks that trained with disttrain.strategy(): the median time of a
synchronous step, the median time each spent between steps, its slowest
epoch, and a straggler (a task persistently slower between steps, which every
step waits for) named.
"""


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Everything `launch.local` needs to run a job; built from the command line.

    Attributes:
        workers: number of `worker` tasks.
        chief: add a separate `chief` task (else worker 0 is the chief).
        evaluator: add an `evaluator` task (not part of the training cluster).
        host: address the tasks listen on.
        run_id: `DISTTRAIN_RUN_ID` of every task.
        command: what every task runs.
        grace: seconds between SIGTERM and SIGKILL when stopping tasks.
        max_restarts: how many times the group is started again after a failure.
        timeout: seconds the whole job may take, or None.
        startup_timeout: seconds each task has to write its first output, or None.
        log_dir: where `attempt-N/<task>.stdout.log` and `.stderr.log` go, or None.
        chief_only_output: show only the chief's output on the console.
        show_all: also show TensorFlow's known-harmless start-up lines (`launch.noise`).
        dry_run: print what would run and start nothing.
        threads_per_worker: size of each task's TensorFlow and OpenMP thread pools;
            None: `threads_per_task` (this machine's cores shared out); 0: leave
            TensorFlow's defaults (every task sized to all cores).
        listen_all: leave the tasks' ports open to other hosts (else `launch.firewall`
            admits only this machine, where it can).
    """

    workers: int = 1
    chief: bool = False
    evaluator: bool = False
    host: str = "127.0.0.1"
    run_id: str = dataclasses.field(default_factory=new_run_id)
    command: tuple[str, ...] = DEFAULT_COMMAND
    grace: float = 10.0
    max_restarts: int = 0
    timeout: float | None = None
    startup_timeout: float | None = None
    log_dir: pathlib.Path | None = None
    chief_only_output: bool = False
    show_all: bool = False
    dry_run: bool = False
    threads_per_worker: int | None = None
    listen_all: bool = False

    @property
    def num_tasks(self) -> int:
        return self.workers + self.chief + self.evaluator

    @property
    def threads(self) -> int:
        """Threads per task: `threads_per_worker`, or this machine's cores shared out."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return threads_per_task(self.num_tasks)


def _number(kind: type, minimum: float, inclusive: bool = True):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (not inclusive and value == minimum):
            bound = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        usage="%(prog)s [options] [-- command [args ...]]",
        description="Run a multi-worker TensorFlow job on this machine: one process per "
                    "task, each with its own TF_CONFIG. Without a command, runs the "
                    "disttrain demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=_number(int, 1), default=1, metavar="N",
                        help="number of worker tasks (default 1)")
    parser.add_argument("--chief", action="store_true",
                        help="add a separate chief task (default: worker 0 is the chief)")
    parser.add_argument("--evaluator", action="store_true",
                        help="add an evaluator task (not a training task: if it fails, that is "
                             "reported, but training goes on and the exit code and restarts "
                             "are decided by the training tasks alone)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the tasks listen on (default 127.0.0.1)")
    parser.add_argument("--run-id", help="DISTTRAIN_RUN_ID (default: <yyyymmdd-hhmmss>-<6 hex>)")
    parser.add_argument("--grace", type=_number(float, 0), default=10.0, metavar="SECONDS",
                        help="time between SIGTERM and SIGKILL when stopping tasks (default 10)")
    parser.add_argument("--max-restarts", type=_number(int, 0), default=0, metavar="K",
                        help="restart the whole group on fresh ports up to K times after a "
                             "failure (default 0); a port clash relaunches without using one")
    parser.add_argument("--timeout", type=_number(float, 0, inclusive=False), metavar="SECONDS",
                        help="time limit for the whole job; on expiry, dump every task's "
                             "Python stacks and stop them (exit 124)")
    parser.add_argument("--startup-timeout", type=_number(float, 0, inclusive=False),
                        metavar="SECONDS",
                        help="each task must write its first output (stdout or stderr) within "
                             "this time of starting, else the attempt fails like --timeout")
    parser.add_argument("--log-dir", type=pathlib.Path, metavar="DIR",
                        help="write DIR/attempt-N/<task>.stdout.log and .stderr.log (raw "
                             "output), DIR/result.json and DIR/timing-<task>.json")
    parser.add_argument("--chief-only-output", action="store_true",
                        help="show only the chief's output (the others still go to --log-dir)")
    parser.add_argument("--show-all", action="store_true",
                        help="also show TensorFlow's known-harmless start-up lines (hidden by "
                             "default; listed in launch/noise.py)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each task's environment additions and command; start nothing")
    parser.add_argument("--threads-per-worker", type=_number(int, 0), metavar="N",
                        help="cap each task's thread pools (TF_NUM_INTRAOP_THREADS, "
                             "TF_NUM_INTEROP_THREADS, OMP_NUM_THREADS) at N; default: the CPU "
                             "cores divided by the number of tasks, so tasks do not oversubscribe "
                             "the cores; 0: TensorFlow's defaults. Variables already set in the "
                             "environment win")
    parser.add_argument("--listen-all", action="store_true",
                        help="leave the workers' ports open to other hosts (default: run as "
                             "root, the launcher admits only this machine to them)")
    return parser


def parse_args(argv: Sequence[str]) -> LaunchConfig:
    """Parses and validates the command line; exits with code 2 on any error."""
    parser = build_parser()
    options, command = split_command(argv)
    if command == []:
        parser.error("no command after '--'")
    ns, extra = parser.parse_known_args(options)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} "
                     "(put the command to run after '--')")
    overrides = {}
    try:
        parse_address(f"{ns.host}:1", "--host")
        if ns.run_id is not None:
            overrides["run_id"] = validate_run_id(ns.run_id, "--run-id")
    except ClusterConfigError as e:
        parser.error(str(e))
    if command:
        problem = _command_problem(command[0])
        if problem:
            parser.error(problem)
    return LaunchConfig(
        workers=ns.workers, chief=ns.chief, evaluator=ns.evaluator, host=ns.host,
        command=tuple(command or DEFAULT_COMMAND), grace=ns.grace,
        max_restarts=ns.max_restarts, timeout=ns.timeout, startup_timeout=ns.startup_timeout,
        log_dir=ns.log_dir, chief_only_output=ns.chief_only_output, show_all=ns.show_all,
        dry_run=ns.dry_run,
        threads_per_worker=ns.threads_per_worker, listen_all=ns.listen_all, **overrides,
    )


def _command_problem(program: str) -> str | None:
    if os.sep in program:
        if os.path.isfile(program) and os.access(program, os.X_OK):
            return None
        return f"command {program!r} is not an executable file"
    if shutil.which(program) is None:
        return f"command {program!r} not found on PATH"
    return None


def plan_tasks(config: LaunchConfig, attempt: int,
               result_file: str) -> list[tuple[TaskSpec, dict[str, str]]]:
    """Each task of one attempt with its environment additions; picks fresh ports."""
    ports = free_ports(config.workers + config.chief)
    addresses = local_addresses(ports, config.host)
    chief = addresses.pop(0) if config.chief else None
    plan = []
    for task in cluster_specs(addresses, chief=chief, evaluator=config.evaluator):
        env = {
            ENV_TF_CONFIG: task.to_json(),
            ENV_RUN_ID: config.run_id,
            ENV_ATTEMPT: str(attempt),
            ENV_RESULT_FILE: result_file,
            step_timing.ENV_TIMING_FILE: _timing_file(result_file, task.label),
            "PYTHONUNBUFFERED": "1",
        }
        env.update((k, v) for k, v in DEFAULT_ENV.items() if k not in os.environ)
        env.update(thread_env(config.threads))
        plan.append((task, env))
    return plan


def _timing_file(result_file: str, label: str) -> str:
    return os.path.join(os.path.dirname(result_file), f"timing-{label}.json")


def print_dry_run(config: LaunchConfig) -> None:
    result_file = (str(config.log_dir / "result.json") if config.log_dir else
                   os.path.join(tempfile.gettempdir(), f"disttrain-{config.run_id}-XXXXXX",
                                "result.json"))
    lines = [f"# dry run of {config.run_id}: {config.num_tasks} tasks, attempt 0 shown; "
             "nothing started"]
    for task, env in plan_tasks(config, 0, result_file):
        lines.append(f"{task.label}:")
        lines += [f"  {key}={shlex.quote(value)}" for key, value in env.items()]
        lines.append(f"  command: {shlex.join(config.command)}")
    print("\n".join(lines), flush=True)


def run(config: LaunchConfig) -> int:
    """Runs the job described by `config`; returns the launcher's exit code."""
    console = Console(sys.stdout.buffer, sys.stderr.buffer)
    cores = os.cpu_count() or 1
    if config.num_tasks > cores:
        console.info(f"warning: {config.num_tasks} tasks on {cores} CPU cores; "
                     "they will compete for CPU")
    if config.dry_run:
        print_dry_run(config)
        return 0
    if config.log_dir is not None:
        config.log_dir.mkdir(parents=True, exist_ok=True)
        result_dir = None
        result_file = config.log_dir / "result.json"
    else:
        result_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"disttrain-{config.run_id}-"))
        result_file = result_dir / "result.json"
    try:
        with procs.SignalInbox() as signals:
            watchdog = procs.Watchdog(console)
            guard = _port_guard(config, console, watchdog)
            try:
                return _Job(config, console, watchdog, signals, result_file, guard).run()
            finally:
                if guard is not None:
                    guard.remove()
                watchdog.close()
    finally:
        if result_dir is not None:
            shutil.rmtree(result_dir, ignore_errors=True)


def _port_guard(config: LaunchConfig, console: Console,
                watchdog: procs.Watchdog) -> firewall.LoopbackOnly | None:
    """The firewall that keeps other hosts off the tasks' ports, or None (said once, with why
    and the fix, unless --listen-all asked for open ports)."""
    if config.listen_all:
        console.info("--listen-all: the workers' ports accept connections from other hosts")
        return None
    try:
        return firewall.LoopbackOnly.install(watchdog)
    except FirewallUnavailable as e:
        console.info(f"warning: {firewall.EXPOSED} ({e}). Fix: {firewall.FIX}")
        return None


class _Job:
    """The attempts of one job, their restarts and the final report."""

    def __init__(self, config: LaunchConfig, console: Console, watchdog: procs.Watchdog,
                 signals: procs.SignalInbox, result_file: pathlib.Path,
                 guard: firewall.LoopbackOnly | None = None):
        self._config = config
        self._guard = guard
        self._console = console
        self._watchdog = watchdog
        self._signals = signals
        self._result_file = result_file
        self._outcomes: list[procs.Outcome] = []
        self._restarts = 0
        self._clash_relaunches = 0

    def run(self) -> int:
        config = self._config
        started = time.monotonic()
        self._console.info(
            f"run {config.run_id}: {config.num_tasks} task(s), command: "
            f"{shlex.join(config.command)}")
        while True:
            pending = self._signals.take()
            if pending:
                self._console.info("got a signal between attempts: not starting again")
                code = 128 + pending[0]
                break
            try:
                outcome = self._attempt(len(self._outcomes), started)
            except procs.StartError as e:
                self._console.info(str(e))
                code = EXIT_CANNOT_EXECUTE
                break
            self._outcomes.append(outcome)
            if not self._try_again(outcome, started):
                code = self._exit_code(outcome)
                self._report_side_failures(outcome)
                self._report_failure(outcome)
                break
        self._summary(code, time.monotonic() - started)
        return code

    def _attempt(self, attempt: int, job_started: float) -> procs.Outcome:
        config = self._config
        self._result_file.unlink(missing_ok=True)
        plan = plan_tasks(config, attempt, str(self._result_file))
        for task, env in plan:
            pathlib.Path(env[step_timing.ENV_TIMING_FILE]).unlink(missing_ok=True)
        addresses = " ".join(
            f"{task.label}={task.cluster.training_addresses[task.cluster.worker_rank]}"
            for task, _ in plan if task.task_type != "evaluator")
        self._console.info(f"attempt {attempt}: {addresses}")
        self._close_ports(plan)
        specs = [
            procs.WorkerSpec(
                label=task.label,
                argv=config.command,
                env={**os.environ, **env},
                essential=task.task_type != "evaluator",
                show_output=not config.chief_only_output or task.cluster.is_chief,
            )
            for task, env in plan
        ]
        options = procs.GroupOptions(
            grace=config.grace,
            job_started=job_started,
            timeout=config.timeout,
            startup_timeout=config.startup_timeout,
            log_dir=config.log_dir / f"attempt-{attempt}" if config.log_dir else None,
            watch=PORT_CLASH,
            hide=None if config.show_all else noise.is_known_harmless,
        )
        return procs.run_group(specs, options, self._console, self._watchdog, self._signals)

    def _close_ports(self, plan: list[tuple[TaskSpec, dict[str, str]]]) -> None:
        """Admits only this machine to this attempt's ports; if the firewall fails now, says
        so and drops it (the ports of this and later attempts stay open)."""
        if self._guard is None:
            return
        ports = [parse_address(task.cluster.training_addresses[task.cluster.worker_rank])[1]
                 for task, _ in plan if task.task_type != "evaluator"]
        try:
            self._guard.admit_only_loopback(ports)
        except FirewallUnavailable as e:
            self._console.info(f"warning: {firewall.EXPOSED} ({e}). Fix: {firewall.FIX}")
            self._guard.remove()
            self._guard = None

    def _try_again(self, outcome: procs.Outcome, job_started: float) -> bool:
        timeout = self._config.timeout
        if outcome.reason not in (procs.FAILED, procs.STARTUP_TIMEOUT):
            return False
        if timeout is not None and time.monotonic() - job_started >= timeout:
            self._console.info(f"--timeout {timeout:g}s has passed: not starting again")
            return False
        if outcome.reason == procs.FAILED:
            hit = outcome.result(outcome.culprit).watch_hit
            if hit is not None and self._clash_relaunches < MAX_PORT_CLASH_RELAUNCHES:
                self._clash_relaunches += 1
                self._console.info(
                    f"{outcome.culprit} could not bind its port ({hit.strip()}): relaunching "
                    f"on fresh ports, not counted as a restart "
                    f"({self._clash_relaunches}/{MAX_PORT_CLASH_RELAUNCHES})")
                return True
        if self._restarts < self._config.max_restarts:
            self._restarts += 1
            self._console.info(
                f"restarting the group on fresh ports "
                f"(restart {self._restarts}/{self._config.max_restarts})")
            return True
        return False

    @staticmethod
    def _exit_code(outcome: procs.Outcome) -> int:
        if outcome.reason == procs.OK:
            return 0
        if outcome.reason == procs.FAILED:
            return outcome.result(outcome.culprit).exit_code
        if outcome.reason == procs.SIGNALLED:
            return 128 + outcome.signum
        return EXIT_TIMEOUT

    def _report_failure(self, outcome: procs.Outcome) -> None:
        if outcome.culprit is None:
            return
        culprit = outcome.result(outcome.culprit)
        if outcome.reason == procs.FAILED:
            what = f"exited with {procs.describe_exit(culprit.exit_code)}"
        else:
            what = "wrote no output before the startup timeout"
        self._console.info(
            f"{culprit.label} failed first: {what}; last lines of its stderr:")
        for line in culprit.stderr_tail or ("(nothing)",):
            self._console.info(f"  | {line}")
        if outcome.reason == procs.FAILED:
            for early in outcome.early_exits:
                self._console.info(f"note: {early.describe()}")

    def _report_side_failures(self, outcome: procs.Outcome) -> None:
        for label in outcome.side_failures:
            result = outcome.result(label)
            self._console.info(
                f"{label} failed (ignored: not a training task); last lines of its stderr:")
            for line in result.stderr_tail or ("(nothing)",):
                self._console.info(f"  | {line}")

    def _summary(self, code: int, elapsed: float) -> None:
        attempts = len(self._outcomes)
        extra = []
        if self._restarts:
            extra.append(f"{self._restarts} restart(s)")
        if self._clash_relaunches:
            extra.append(f"{self._clash_relaunches} port-clash relaunch(es)")
        lines = [
            f"summary of {self._config.run_id}: exit {procs.describe_exit(code)} after "
            f"{elapsed:.1f}s, {attempts} attempt(s)" + (f" ({', '.join(extra)})" if extra else ""),
        ]
        if self._outcomes:
            last, earlier = self._outcomes[-1], self._outcomes[:-1]
            history = {r.label: self._earlier_exits(r.label, earlier) for r in last.results}
            width = max([len("earlier attempts"), *map(len, history.values())])
            column = f"{'earlier attempts':<{width}}  " if earlier else ""
            lines.append(f"  {'task':<10} {'exit':<14} {'wall':>8}  {column}note")
            early = ({e.label for e in last.early_exits} if last.reason == procs.FAILED
                     else set())
            for r in last.results:
                note = ("root cause" if r.label == last.culprit else
                        "stopped by launcher" if r.stopped else
                        "evaluator failure, ignored" if r.label in last.side_failures else
                        "exited 0 while others trained (see note)" if r.label in early else "")
                column = f"{history[r.label]:<{width}}  " if earlier else ""
                lines.append(f"  {r.label:<10} {procs.describe_exit(r.exit_code):<14} "
                             f"{r.wall_s:>7.1f}s  {column}{note}".rstrip())
            if any(outcome.culprit for outcome in earlier):
                lines.append("  * root cause of that attempt")
            hidden = sum(r.hidden_lines for outcome in self._outcomes for r in outcome.results)
            if hidden:
                kept = " (all in --log-dir)" if self._config.log_dir else ""
                lines.append(f"  {hidden} known-harmless TensorFlow start-up line(s) hidden"
                             f"{kept}; --show-all shows them")
            lines += step_timing.summary_lines({
                r.label: step_timing.read(_timing_file(str(self._result_file), r.label))
                for r in last.results if r.label != "evaluator"})
        lines += self._result_lines()
        self._console.info("\n".join(lines))

    @staticmethod
    def _earlier_exits(label: str, earlier: Sequence[procs.Outcome]) -> str:
        """`label`'s exit code in each earlier attempt, oldest first; * marks a root cause."""
        codes = []
        for outcome in earlier:
            result = next((r for r in outcome.results if r.label == label), None)
            if result is None:
                codes.append("-")
            else:
                mark = "*" if label == outcome.culprit else ""
                codes.append(f"{result.exit_code}{mark}")
        return ", ".join(codes)

    def _result_lines(self) -> list[str]:
        try:
            text = self._result_file.read_text()
        except FileNotFoundError:
            return []
        try:
            result = json.loads(text)
        except json.JSONDecodeError:
            return [f"result file {self._result_file} is not valid JSON:", text[:2000]]
        if not isinstance(result, dict):
            return [f"result ({ENV_RESULT_FILE}): {json.dumps(result)}"]
        width = max((len(k) for k in result), default=0)
        return [f"result ({ENV_RESULT_FILE}):"] + [
            f"  {key:<{width}}  {value if isinstance(value, str) else json.dumps(value)}"
            for key, value in result.items()
        ]


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
