"""Fault injection's driver (`python -m benchmarks.faults`, tests/benchmarks/test_faults.py):
`plan_fault` picks a victim and a moment per seed, `run_fault_job` runs
`workloads.fault_training.fault_train` under the launcher and collects what it left
(`run_pod_fault_job`: as simulated Kubernetes pods, for the link-down kind), and the
`*_problems` functions check it against an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import posixpath
import random
import re
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from disttrain import storage
from disttrain.errors import StorageError
from disttrain.testing import MARKER_ENV, LaunchedJob, function_command, run_launcher, wait_gone
from launch import k8s
from launch.local import thread_env, threads_per_task
from workloads import k8s_pods, pod_network
from workloads.fault_training import (
    CHECKPOINT_NAME,
    DISK_FULL,
    ENV_FAULT_CGROUP,
    ENV_FAULT_KIND,
    ENV_FAULT_RANK,
    ENV_FAULT_STEP,
    ENV_FAULT_WHEN,
    KINDS,
    LINK_DOWN,
    NETWORK_CUT,
    ENV_STORAGE_PID,
    RENAMES_UNDER,
    STEPS_PER_EPOCH,
    STORAGE_KILL,
    WEIGHT_TOLERANCE,
    WORKER_KILL,
    WORKER_STOP,
    cut_rule,
    fault_train,
)
from workloads.gcs_server import start_emulator, stop

BUCKET = "disttrain-faults"

# The bound on a worker noticing a `NETWORK_CUT` (TensorFlow's coordination-service heartbeat
# timeout, about 10 s plus the in-flight step, measured on a loaded 2-core machine).
CUT_NOTICED_WITHIN = 30.0


@dataclasses.dataclass(frozen=True)
class Fault:
    """One planned fault: its kind, the rank it strikes, when, and (renames) before or after.

    `step` is a global step from 1 for the step kinds, the number (from 1) of
    the rename into the kind's directory for the chief-kill kinds. For
    storage-kill, `when` is the delay in seconds after that step's epoch ends
    and `down` the seconds the storage server stays dead.
    """

    kind: str
    rank: int
    step: int
    when: str = "before"
    down: float = 0.0

    def env(self) -> dict[str, str]:
        """The environment that makes `fault_train` strike this fault."""
        return {ENV_FAULT_KIND: self.kind, ENV_FAULT_RANK: str(self.rank),
                ENV_FAULT_STEP: str(self.step), ENV_FAULT_WHEN: self.when}

    def describe(self) -> str:
        """e.g. `w1 step 7`, `w0 rename 3 after` or `w0 step 12 +0.08s down 3.1s`."""
        if self.kind == STORAGE_KILL:
            return f"w{self.rank} step {self.step} +{self.when}s down {self.down:.1f}s"
        if self.kind in RENAMES_UNDER:
            return f"w{self.rank} rename {self.step} {self.when}"
        return f"w{self.rank} step {self.step}"


def plan_fault(seed: int, workers: int, epochs: int, kind: str = WORKER_KILL,
               renames: dict[str, int] | None = None) -> Fault:
    """The fault that `seed` picks: victim and moment, uniformly among the possible ones.

    Args:
        seed: seeds `random.Random`.
        workers: workers per job.
        epochs: epochs per job.
        kind: one of `KINDS`.
        renames: for the chief-kill kinds, the chief's rename counts of an
            uninterrupted run (`FaultRun.renames`).
    """
    rng = random.Random(seed)
    if kind in (WORKER_KILL, WORKER_STOP, NETWORK_CUT, LINK_DOWN):
        return Fault(kind, rng.randrange(workers), rng.randint(1, epochs * STEPS_PER_EPOCH))
    if kind == DISK_FULL:
        return Fault(kind, 0, rng.randint(1, epochs * STEPS_PER_EPOCH))
    if kind == STORAGE_KILL:
        return Fault(kind, 0, rng.randint(1, epochs) * STEPS_PER_EPOCH,
                     f"{rng.uniform(0, 0.4):.2f}", round(rng.uniform(0.5, 40), 1))
    if kind in RENAMES_UNDER:
        total = (renames or {}).get(RENAMES_UNDER[kind], 0)
        if total < 1:
            raise ValueError(f"plan_fault({kind!r}) needs the rename counts of an "
                             f"uninterrupted run, got {renames!r}")
        return Fault(kind, 0, rng.randint(1, total), rng.choice(["before", "after"]))
    raise ValueError(f"unknown fault kind {kind!r}; choose one of {sorted(KINDS)}")


# How long gcsfs keeps retrying one request to a dead server before it raises (gcsfs 2026.10.1,
# gcsfs/retry.py `retry_request`, applied to every HTTP call with `GCSFileSystem.retries = 6`):
# 6 tries, sleeping min(2**(n-1) + random(), 32) s before try n+1, so 1+2+4+8+16 = 31 s plus up
# to 5 s of jitter after the first refused try; a refused connection fails at once.
GCSFS_GIVES_UP_AFTER = 36.0
# A storage-kill outage past those retries however late in the save the kill lands (the next
# request may start a few seconds after the kill), short enough that the restarted attempt
# meets it (its first read retries too) rather than waiting for it.
STORAGE_DOWN_PAST_RETRIES = 45.0


def with_outage(fault: Fault, down: float) -> Fault:
    """`fault` (a storage-kill) with the emulator kept down `down` seconds, whatever its seed
    drew: `plan_fault`'s draws stay as they are for every seed.

    Example:

    ```
    fault = with_outage(plan_fault(3, 2, 4, STORAGE_KILL), STORAGE_DOWN_PAST_RETRIES)
    ```
    """
    if fault.kind != STORAGE_KILL:
        raise ValueError(f"with_outage sets a storage-kill's outage, got a {fault.kind!r} fault")
    return dataclasses.replace(fault, down=down)


@dataclasses.dataclass
class FaultRun:
    """One `fault_train` job under `launch.local` and what its workers left in `result_dir`.

    Attributes:
        job: the launcher's exit, output and survivors.
        results: rank -> the `<rank>-<attempt>.json` of the last attempt that wrote one.
        epochs: rank -> the (attempt, epoch) pairs it finished, in order.
        fault: what the victim wrote just before the fault struck, or None.
        began: (rank, attempt) -> the time that attempt's fit began on that rank.
        renames: the chief's rename counts of its last attempt (`RENAMES_UNDER` keys).
        checkpoint_dir: the ModelCheckpoint directory.
        storage: what the checks found in the checkpoint and backup directories
            right after the job (`storage_problems`), checked while a disk-full
            job's tmpfs was still mounted.
        listed: the file names the ModelCheckpoint index (`best.json`) lists.
        failed: (rank, attempt) -> the time fit raised on that rank in that attempt.
        ended_while_down: storage-kill only: the job ended while the storage
            server was dead (no write of the job met the restarted server).
        left_behind: link-down only: namespaces or /etc/netns entries of the
            pods still there after the job (`pod_network.leftovers`).
        cut_at: link-down only: when the driver set the victim's link down.
    """

    job: LaunchedJob
    results: dict[int, dict]
    epochs: dict[int, list[tuple[int, int]]]
    fault: dict | None
    began: dict[tuple[int, int], float]
    renames: dict[str, int]
    checkpoint_dir: str
    storage: list[str]
    listed: list[str]
    failed: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    ended_while_down: bool = False
    left_behind: list[str] = dataclasses.field(default_factory=list)
    cut_at: float | None = None


def run_fault_job(result_dir: str, workers: int, epochs: int, fault: Fault | None,
                  max_restarts: int, timeout: float) -> FaultRun:
    """Runs `fault_train` on `workers` local workers, striking `fault` (None: no fault).

    `result_dir` is created if needed and should be empty. For `DISK_FULL` the
    checkpoint directory is a 1 MiB tmpfs mounted for the job (needs root). For
    `STORAGE_KILL` the checkpoints and backups go to `gs://` on a GCS emulator
    keeping its objects under `result_dir/gcs`; once the chief kills it, it is
    restarted on the same port and directory `fault.down` seconds later.
    """
    os.makedirs(result_dir, exist_ok=True)
    on_gcs = fault is not None and fault.kind == STORAGE_KILL
    root = f"gs://{BUCKET}" if on_gcs else result_dir
    checkpoint_dir = f"{root}/checkpoints"
    if not on_gcs:
        os.makedirs(checkpoint_dir)
    command = function_command(fault_train, {
        "result_dir": result_dir, "backup_dir": f"{root}/backup-{{run_id}}",
        "checkpoint_dir": checkpoint_dir, "epochs": epochs})
    mounted = fault is not None and fault.kind == DISK_FULL
    if mounted:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", checkpoint_dir],
                       check=True)
    server = _StorageServer(result_dir, fault.down) if on_gcs else None
    env = {} if fault is None else fault.env()
    cut = fault is not None and fault.kind == NETWORK_CUT
    try:
        if server is not None:
            env.update(server.env())
        with network_cut(os.path.basename(result_dir)) if cut else contextlib.nullcontext() as cg:
            if cg is not None:
                env[ENV_FAULT_CGROUP] = cg
            job = run_launcher(["--workers", str(workers), "--max-restarts", str(max_restarts),
                                "--grace", "1", "--", *command], timeout=timeout, env=env)
        ended_while_down = server is not None and server.restarted_at is None
        if server is not None:
            found = server.check(root)
        else:
            found = storage_problems(root)
        try:
            index = {} if emulator_broke(found) else (
                storage.read_json(f"{checkpoint_dir}/best.json") or {})
        except StorageError as e:
            found.append(f"the checkpoint index is unreadable: {e}")
            index = {}
        listed = [posixpath.basename(r["path"]) for r in index.get("checkpoints", [])]
    finally:
        if mounted:
            subprocess.run(["umount", checkpoint_dir], check=True)
        if server is not None:
            server.close()
    return FaultRun(job, checkpoint_dir=checkpoint_dir, storage=found, listed=listed,
                    ended_while_down=ended_while_down,
                    **_worker_records(result_dir, workers, max_restarts + 1))


def _worker_records(result_dir: str, workers: int, attempts: int) -> dict:
    """What `fault_train`'s workers wrote under `result_dir` in `attempts` attempts: the
    `FaultRun` fields results, epochs, fault, began, renames and failed."""
    results, finished, began, failed = {}, {}, {}, {}
    for rank in range(workers):
        for attempt in range(attempts):
            result = _read_json(os.path.join(result_dir, f"{rank}-{attempt}.json"))
            if result is not None:
                results[rank] = result
            start = _read_json(os.path.join(result_dir, f"began-{rank}-{attempt}.json"))
            if start is not None:
                began[rank, attempt] = start["time"]
            raised = _read_json(os.path.join(result_dir, f"failed-{rank}-{attempt}.json"))
            if raised is not None:
                failed[rank, attempt] = raised["time"]
        log = os.path.join(result_dir, f"epochs-{rank}.log")
        with contextlib.suppress(FileNotFoundError), open(log) as f:
            finished[rank] = [tuple(map(int, line.split())) for line in f]
    renames = {}
    for attempt in range(attempts):
        renames = _read_json(os.path.join(result_dir, f"renames-{attempt}.json")) or renames
    return {"results": results, "epochs": finished,
            "fault": _read_json(os.path.join(result_dir, "fault.json")), "began": began,
            "renames": renames, "failed": failed}


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (iptables' cgroup match needs v2), or None:
    `/sys/fs/cgroup` on a v2-only host, `/sys/fs/cgroup/unified` on a hybrid one."""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount_point, fs_type, *_ = line.split()
            if fs_type == "cgroup2":
                return mount_point
    return None


@contextlib.contextmanager
def network_cut(name: str):
    """A cgroup (v2) for a `NETWORK_CUT` victim; yields its directory.

    The victim joins it before it opens any socket (a socket keeps the cgroup
    its process had when it was created) and, at the planned step, inserts
    `iptables -I OUTPUT -m cgroup --path <name> -j DROP` (`CUT_RULE`): from then on
    every packet of its sockets, loopback included, is dropped mid-connection.
    On exit every such rule is deleted, any process still in the cgroup is
    SIGKILLed and the cgroup removed. Needs root.

    Example:

    ```
    with network_cut("seed-3") as cgroup:
        ...  # run the job with DISTTRAIN_FAULT_CGROUP=cgroup
    ```
    """
    root = cgroup2_root()
    if root is None:
        raise RuntimeError("network-cut needs a cgroup v2 hierarchy and none is mounted "
                           "(/proc/mounts lists no cgroup2): mount one, or pick another kind")
    directory = os.path.join(root, f"disttrain-netcut-{os.getpid()}-{name}")
    os.makedirs(directory)
    try:
        yield directory
    finally:
        rule = cut_rule(directory)
        while subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True).returncode == 0:
            pass
        with open(os.path.join(directory, "cgroup.procs")) as f:
            left = [int(pid) for pid in f.read().split()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(directory)
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


EMULATOR_BROKE = "emulator's own store"


def emulator_broke(storage_found: list[str]) -> bool:
    """Whether the storage-kill's emulator could not serve its store again (`FaultRun.storage`):
    its own metadata, not an object disttrain wrote, was damaged by the kill."""
    return any(p.startswith(EMULATOR_BROKE) for p in storage_found)


class _StorageServer:
    """The storage-kill fault's GCS emulator: restarted `down` seconds after it dies.

    Its objects live under `result_dir/gcs`, its log in `result_dir/gcs.log`.
    A failed restart is kept in `restart_error`: the emulator's own store
    (rewritten non-atomically) was damaged by the kill, not disttrain's objects.
    """

    def __init__(self, result_dir: str, down: float):
        self.data_dir, self.log = os.path.join(result_dir, "gcs"), f"{result_dir}/gcs.log"
        self.down = down
        self.proc, self.emulator = start_emulator(BUCKET, self.log, data_dir=self.data_dir,
                                                  atomic_writes=True)
        self.port = int(self.emulator.endpoint.rsplit(":", 1)[1])
        self.restart_error: str | None = None
        self.restarted_at: float | None = None
        self.previous_host = os.environ.get(storage.ENV_STORAGE_EMULATOR_HOST)
        self.closed = threading.Event()
        self.watcher = threading.Thread(target=self._restart_when_killed, daemon=True)
        self.watcher.start()

    def env(self) -> dict[str, str]:
        return {storage.ENV_STORAGE_EMULATOR_HOST: self.emulator.endpoint,
                ENV_STORAGE_PID: str(self.emulator.pid)}

    def _restart_when_killed(self) -> None:
        while self.proc.poll() is None:
            if self.closed.wait(0.05):
                return
        time.sleep(self.down)
        try:
            self.proc, _ = start_emulator(BUCKET, self.log, port=self.port,
                                          data_dir=self.data_dir, atomic_writes=True)
            self.restarted_at = time.time()
        except RuntimeError as e:
            lines = str(e).splitlines()
            self.restart_error = f"{lines[0]} {lines[-1]}"

    def check(self, root: str) -> list[str]:
        """`storage_problems` of `root` through the (restarted) emulator."""
        self.watcher.join(timeout=self.down + 40)
        if self.restart_error:
            return [f"{EMULATOR_BROKE}: restart failed: {self.restart_error}"]
        os.environ[storage.ENV_STORAGE_EMULATOR_HOST] = self.emulator.endpoint
        try:
            return storage_problems(root)
        except (OSError, ValueError) as e:
            return [f"{EMULATOR_BROKE} (or a torn object?): check failed: {e}"]

    def close(self) -> None:
        """Stops the emulator and gives this process back the emulator host it had."""
        self.closed.set()
        self.watcher.join(timeout=self.down + 40)
        if self.proc.poll() is None:
            stop(self.proc)
        if self.previous_host is None:
            os.environ.pop(storage.ENV_STORAGE_EMULATOR_HOST, None)
        else:
            os.environ[storage.ENV_STORAGE_EMULATOR_HOST] = self.previous_host


def storage_problems(root: str) -> list[str]:
    """What a reader of the job's checkpoint and backup directories under `root` (a
    local directory or a URL) could trip on.

    No temp file or write probe left; every directory with a manifest holds
    exactly the files it lists with their sizes and checksums; every file an
    index (`*.json` with `checkpoints`) lists exists and opens as HDF5; no other
    checkpoint file is visible (a half-written one would be).
    """
    import h5py

    fs, base = storage.url_to_fs(root)
    fs.invalidate_cache()
    problems = []
    for directory, _, names in fs.walk(base):
        url = posixpath.join(root, posixpath.relpath(directory, base))
        in_checkpoints = url.startswith(f"{root}/checkpoints")
        if not (posixpath.basename(directory).startswith("backup") or in_checkpoints):
            continue
        for name in names:
            if ".tmp-" in name or name.startswith(storage.PROBE_PREFIX):
                problems.append(f"left behind: {url}/{name}")
        if storage.MANIFEST_NAME in names:
            problem = storage.check_files(url)
            if problem:
                problems.append(f"damaged commit: {problem}")
        listed = set()
        for name in names:
            index = storage.read_json(f"{url}/{name}") if name.endswith(".json") else None
            for record in (index or {}).get("checkpoints", []) if isinstance(index, dict) else []:
                listed.add(posixpath.basename(record["path"]))
                try:
                    with storage.local_copy(record["path"]) as local, h5py.File(local, "r"):
                        pass
                except OSError as e:
                    problems.append(f"index {name} lists {record['path']}, unreadable: {e}")
        for name in names:
            if name.endswith(".h5") and in_checkpoints and name not in listed:
                problems.append(f"unlisted checkpoint visible: {url}/{name}")
    return problems


def max_weight_diff(a: list, b: list) -> float:
    """The largest absolute difference between two lists of weight arrays."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def restart_problems(run: FaultRun, fault: Fault, workers: int, epochs: int,
                     reference: list, tolerance: float = WEIGHT_TOLERANCE) -> list[str]:
    """What is wrong with a job that should have recovered from `fault` with one restart.

    Expected: exit 0 and no process left; the fault struck as planned on attempt
    0; the launcher ran 2 attempts; every worker finished epochs 0..k-1 on
    attempt 0 and k..epochs-1 on attempt 1, where for a step fault k is the
    epoch the fault interrupted, and for a chief kill during a commit at most
    one more than the last epoch attempt 0 finished (the interrupted epoch's
    backup may have been committed or not); every worker ends with the same
    weights, within `tolerance` of `reference` (an uninterrupted run's); the
    checkpoint and backup directories pass `storage_problems`.

    Returns:
        One line per problem; empty when the job recovered as expected.
    """
    job = run.job
    if job.timed_out or job.returncode != 0:
        return [f"exit {job.returncode}" + (" (timed out)" if job.timed_out else "")]
    problems = list(run.storage)
    if job.survivors:
        problems.append(f"processes left: {job.survivors}")
    struck = run.fault and (run.fault["kind"], run.fault["rank"], run.fault["step"])
    if struck != (fault.kind, fault.rank, fault.step):
        problems.append(f"no {fault.describe()} fault: {run.fault}")
    if "2 attempt(s) (1 restart(s))" not in job.stderr:
        problems.append("not exactly 2 attempts")
    for rank in range(workers):
        finished = run.epochs.get(rank, [])
        first = [epoch for attempt, epoch in finished if attempt == 0]
        second = [epoch for attempt, epoch in finished if attempt == 1]
        if fault.kind in RENAMES_UNDER:
            resumed = second[0] if second else epochs
            ok = (first == list(range(len(first))) and resumed <= len(first)
                  and second == list(range(resumed, epochs)))
            expected = f"epochs 0..j then i..{epochs - 1} with i <= j + 1"
        else:
            resumed = (fault.step - 1) // STEPS_PER_EPOCH
            ok = first == list(range(resumed)) and second == list(range(resumed, epochs))
            expected = f"epochs 0..{resumed - 1} then {resumed}..{epochs - 1}"
        if not ok:
            problems.append(f"rank {rank} finished (attempt, epoch) {finished}, expected "
                            + expected)
        result = run.results.get(rank)
        if result is None or result["attempt"] != 1:
            problems.append(f"rank {rank} has no result of attempt 1: {result and result['attempt']}")
        elif result["epochs_run"] != epochs - resumed:
            problems.append(f"rank {rank} ran {result['epochs_run']} epochs on attempt 1, "
                            f"expected {epochs - resumed}")
    weights = [run.results[r]["weights"] for r in sorted(run.results)]
    if any(w != weights[0] for w in weights):
        problems.append("workers ended with different weights")
    if weights and max_weight_diff(weights[0], reference) > tolerance:
        problems.append(f"weights differ from the uninterrupted run by "
                        f"{max_weight_diff(weights[0], reference):.3g} > {tolerance:g}")
    return problems


def worker_errors(stderr: str, workers: int) -> dict[int, str]:
    """rank -> the disttrain error (`Type: message ... Fix: ...`) its last traceback ended
    with, from the launcher's prefixed stderr; ranks that printed none are left out."""
    errors = {}
    for rank in range(workers):
        prefix = f"[w{rank}] "
        text = "\n".join(line[len(prefix):] for line in stderr.splitlines()
                         if line.startswith(prefix))
        found = re.findall(r"^disttrain\.errors\.(\w+: .*?Fix: [^\n]*)", text,
                           re.MULTILINE | re.DOTALL)
        if found:
            errors[rank] = found[-1]
    return errors


def disk_full_problems(run: FaultRun, fault: Fault, workers: int) -> list[str]:
    """What is wrong with a job whose chief's checkpoint disk filled up (`DISK_FULL`).

    Expected: the job fails within its timeout (no restart) and no process is
    left; every worker printed the same disttrain error naming the full disk
    (`No space left`) and a fix; every checkpoint saved before the disk filled
    is still listed and readable, nothing else is visible (`storage_problems`).
    """
    job = run.job
    if job.timed_out or job.returncode in (0, None):
        return [f"exit {job.returncode}" + (" (timed out)" if job.timed_out else "")]
    problems = list(run.storage)
    if job.survivors:
        problems.append(f"processes left: {job.survivors}")
    if run.fault is None or run.fault["step"] != fault.step:
        problems.append(f"the disk was not filled at step {fault.step}: {run.fault}")
    errors = worker_errors(job.stderr, workers)
    if sorted(errors) != list(range(workers)):
        problems.append(f"only workers {sorted(errors)} printed a disttrain error")
    elif len(set(errors.values())) != 1:
        problems.append(f"the workers printed different errors: {errors}")
    elif "No space left" not in errors[0]:
        problems.append(f"the error does not name the full disk: {errors[0][:300]}")
    saved = sorted(run.listed)
    expected = [CHECKPOINT_NAME.format(epoch=e + 1)
                for e in range((fault.step - 1) // STEPS_PER_EPOCH)]
    if saved != expected:
        problems.append(f"checkpoints listed {saved}, expected those saved before the disk "
                        f"filled: {expected}")
    return problems


def storage_kill_problems(run: FaultRun, fault: Fault, workers: int, epochs: int,
                          reference: list, tolerance: float = WEIGHT_TOLERANCE) -> list[str]:
    """What is wrong with a job whose storage server was killed mid-save (`STORAGE_KILL`).

    Expected: the server was killed as planned and no process is left; the
    job either exits 0, every worker with the same weights within `tolerance`
    of `reference`, after one attempt (the uploads were retried) or two (every
    worker of attempt 0 printed a `StorageError` naming the gs:// URL and a
    fix, and attempt 1 resumed at most one epoch after the last one attempt 0
    finished), or fails with that error on every worker; either way every
    checkpoint and backup the job left passes `storage_problems` (no manifest
    naming a missing or torn object) and, when the job failed, every epoch's
    checkpoint saved before the kill is listed. Where the emulator could not
    serve its own store again (`emulator_broke`), the objects cannot be read
    back: only the workers' errors are checked.
    """
    job = run.job
    if job.timed_out or job.returncode is None:
        return [f"exit {job.returncode} (timed out)"]
    broke = emulator_broke(run.storage)
    problems = [] if broke else list(run.storage)
    if job.survivors:
        problems.append(f"processes left: {job.survivors}")
    if run.fault is None or run.fault["step"] != fault.step:
        problems.append(f"the storage server was not killed after step {fault.step}: {run.fault}")
    attempts = 1 if "1 attempt(s)" in job.stderr else 2
    errors = worker_errors(job.stderr, workers)
    if job.returncode != 0 or attempts == 2:
        if sorted(errors) != list(range(workers)):
            problems.append(f"only workers {sorted(errors)} printed a disttrain error")
        elif not all(e.startswith("StorageError") and "gs://" in e for e in errors.values()):
            problems.append(f"not a StorageError naming the gs:// URL: {errors}")
    if job.returncode != 0 and not broke:
        before = [CHECKPOINT_NAME.format(epoch=e + 1)
                  for e in range(fault.step // STEPS_PER_EPOCH - 1)]
        if not set(before) <= set(run.listed):
            problems.append(f"checkpoints listed {sorted(run.listed)}, expected at least "
                            f"those saved before the kill: {before}")
    if job.returncode != 0:
        return problems
    for rank in range(workers):
        finished = run.epochs.get(rank, [])
        first = [epoch for attempt, epoch in finished if attempt == 0]
        second = [epoch for attempt, epoch in finished if attempt == 1]
        resumed = second[0] if second else epochs
        if not (first == list(range(len(first))) and resumed <= len(first)
                and len(first) + len(second) >= epochs and second == list(range(resumed, epochs))):
            problems.append(f"rank {rank} finished (attempt, epoch) {finished} in {attempts} "
                            f"attempt(s)")
    weights = [run.results[r]["weights"] for r in sorted(run.results)]
    if len(weights) != workers or any(w != weights[0] for w in weights):
        problems.append(f"{len(weights)} of {workers} workers ended, with different weights")
    elif max_weight_diff(weights[0], reference) > tolerance:
        problems.append(f"weights differ from the uninterrupted run by "
                        f"{max_weight_diff(weights[0], reference):.3g} > {tolerance:g}")
    return problems


def restart_seconds(run: FaultRun) -> float | None:
    """Seconds from the fault to the first worker of attempt 1 starting fit, or None."""
    restarted = [t for (_, attempt), t in run.began.items() if attempt == 1]
    if run.fault is None or not restarted:
        return None
    return min(restarted) - run.fault["time"]


def detection_seconds(run: FaultRun) -> dict[int, float]:
    """rank -> seconds from the fault to fit raising on that rank in attempt 0; ranks whose
    fit did not raise (killed before noticing, or never struck) are left out."""
    if run.fault is None:
        return {}
    return {rank: t - run.fault["time"] for (rank, attempt), t in run.failed.items()
            if attempt == 0}


def network_cut_problems(run: FaultRun, workers: int, within: float) -> list[str]:
    """What is wrong with how a `NETWORK_CUT` was noticed: every worker's fit of attempt 0
    must have raised by itself (not been stopped by the launcher first), within `within`
    seconds of the cut. `restart_problems` checks the recovery."""
    detected = detection_seconds(run)
    problems = []
    missed = [rank for rank in range(workers) if rank not in detected]
    if missed:
        problems.append(f"workers {missed} did not notice the cut themselves")
    late = {rank: round(s, 1) for rank, s in detected.items() if s > within}
    if late:
        problems.append(f"noticed the cut later than {within:g}s: {late}")
    return problems


def _read_json(path: str):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return json.load(f)
    return None


# The link-down kind's simulated JobSet (`launch.k8s --format jobset`): its name, the seconds a
# pod waits for its peers, and those between SIGTERM and SIGKILL when the others are stopped
# (as `run_fault_job`'s `launch.local --grace 1`).
POD_JOB = "faults"
POD_PEER_TIMEOUT = 60
POD_GRACE = 1.0


def run_pod_fault_job(result_dir: str, workers: int, epochs: int, fault: Fault | None,
                      max_restarts: int, timeout: float) -> FaultRun:
    """Runs `fault_train` as the pods of a generated JobSet, each in a network namespace of its
    own, restarting them all like JobSet's failure policy; for a `LINK_DOWN` fault, sets the
    victim's link down at its planned step.

    The pods are those of `launch.k8s --format jobset` (`python -m launch.entrypoint`
    derives TF_CONFIG from each pod's hostname and index), each with the environment
    Kubernetes would give it (`workloads.k8s_pods`, `DISTTRAIN_ATTEMPT` from JobSet's
    restart-attempt pod label), plus the fault's variables and `launch.local`'s thread caps,
    on fresh namespaces, links and bridge every attempt (`workloads.pod_network`).
    Checkpoints and backups are on this machine's filesystem under `result_dir`, the disk all
    pods share. When a pod exits non-zero the driver, as the JobSet controller deleting the
    pods, sends the others SIGTERM and `POD_GRACE` s later SIGKILL, then, while restarts are
    left, starts every pod again. A `LINK_DOWN` victim writes `fault.json` at its step and
    waits; the driver, polling for that file, sets the victim's veth down from the bridge's
    side (`PodNetwork.link_down`): a pulled cable, which the pod's code cannot undo or notice
    except by its traffic stalling (a pod at the restricted Pod Security Standard could not
    set its own link down either).

    Whatever happens (a failure, the timeout, an exception), every process is killed and every
    namespace deleted; the job's processes still alive afterwards are in `job.survivors`,
    namespaces or /etc/netns entries in `left_behind`. `job` is the driver's: `returncode`
    that of the pod that failed first in the last attempt (0, None on timeout), `stderr`
    each pod's output prefixed `[w<i>] ` and the driver's lines, ending with
    `N attempt(s) (N-1 restart(s))`. Needs root and `ip netns`.
    """
    os.makedirs(result_dir, exist_ok=True)
    checkpoint_dir = f"{result_dir}/checkpoints"
    os.makedirs(checkpoint_dir)
    os.makedirs(f"{result_dir}/home")
    command = function_command(fault_train, {
        "result_dir": result_dir, "backup_dir": f"{result_dir}/backup-{{run_id}}",
        "checkpoint_dir": checkpoint_dir, "epochs": epochs})
    config = k8s.JobConfig(name=POD_JOB, workers=workers, image="unused", command=tuple(command),
                           format="jobset", max_restarts=max_restarts,
                           peer_timeout=POD_PEER_TIMEOUT)
    container = k8s_pods.pod_spec(k8s.manifests(config))["containers"][0]
    marker = secrets.token_hex(8)
    env = {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           MARKER_ENV: marker, **thread_env(threads_per_task(workers)),
           **(fault.env() if fault is not None else {})}
    tag = f"dtld-{os.getpid()}"
    started = time.monotonic()
    lines: list[str] = []
    code, cut_at, attempts = None, None, 0
    try:
        for attempt in range(max_restarts + 1):
            attempts += 1
            code, cut = _pod_attempt(config, container, env, attempt,
                                     fault if attempt == 0 else None, result_dir, tag,
                                     started + timeout, lines)
            cut_at = cut_at or cut
            if code in (0, None):
                break
    finally:
        survivors = wait_gone(MARKER_ENV, marker, within=5)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left = pod_network.leftovers(tag)
    seconds = time.monotonic() - started
    lines.append(f"[pods] exit {code} after {seconds:.1f}s, {attempts} attempt(s) "
                 f"({attempts - 1} restart(s))")
    job = LaunchedJob(code, "", "\n".join(lines), seconds, code is None, survivors)
    found = storage_problems(result_dir)
    index = storage.read_json(f"{checkpoint_dir}/best.json") or {}
    listed = [posixpath.basename(r["path"]) for r in index.get("checkpoints", [])]
    return FaultRun(job, checkpoint_dir=checkpoint_dir, storage=found, listed=listed,
                    left_behind=left, cut_at=cut_at,
                    **_worker_records(result_dir, workers, max_restarts + 1))


def _pod_attempt(config: k8s.JobConfig, container: dict, env: dict[str, str], attempt: int,
                 fault: Fault | None, result_dir: str, tag: str, deadline: float,
                 lines: list[str]) -> tuple[int | None, float | None]:
    """One attempt of `run_pod_fault_job`: returns the exit code of the pod that failed first
    (0 when none did; None past `deadline`, `time.monotonic()`) and when the victim's link was
    set down (None if it was not); appends the pods' output and the driver's lines to
    `lines`. The pods carry JobSet's restart-attempt label `attempt`, from which the
    manifest's DISTTRAIN_ATTEMPT comes."""
    logs = [os.path.join(result_dir, f"pod{i}-{attempt}.log") for i in range(config.workers)]
    fault_file = os.path.join(result_dir, "fault.json")
    code: int | None = 0
    cut_at = kill_at = None
    with pod_network.PodNetwork(config.workers, tag) as network:
        for i in range(config.workers):
            network.publish(i, k8s_pods.dns_names(config.hostname(i), config.name, "default"))
        for i in range(config.workers):
            pod_env = {**pod_network.kubernetes_env_here(
                container, i, config.hostname(i), "default", Path(result_dir, "home"),
                attempt=attempt), **env}
            network.start(i, k8s_pods.pod_argv(container, pod_env)[3:], pod_env, Path(logs[i]))
        began = time.monotonic()
        while True:
            codes = [p.poll() for p in network.procs]
            if fault is not None and fault.kind == LINK_DOWN and cut_at is None and (
                    os.path.exists(fault_file)):
                network.link_down(fault.rank)
                cut_at = time.time()
                lines.append(f"[pods] attempt {attempt}: set w{fault.rank}'s link down")
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and kill_at is None:
                code, kill_at = codes[failed[0]], now + POD_GRACE
                lines.append(f"[pods] attempt {attempt}: w{failed[0]} exited with {code} after "
                             f"{now - began:.1f}s: SIGTERM to the others, SIGKILL after "
                             f"{POD_GRACE:g}s")
                for proc in network.procs:
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
            if kill_at is not None and now >= kill_at:
                pod_network.reap(network.procs)
            if now >= deadline:
                lines.append(f"[pods] attempt {attempt}: timed out; killing every pod")
                code = None
                break
            time.sleep(0.02)
    for i, log in enumerate(logs):
        with contextlib.suppress(FileNotFoundError), open(log, errors="replace") as f:
            lines.extend(f"[w{i}] {line.rstrip()}" for line in f)
    return code, cut_at


def link_down_problems(run: FaultRun, workers: int, within: float) -> list[str]:
    """What is wrong with how a `LINK_DOWN` was struck, noticed and cleaned up: the driver set
    the victim's link down, every worker's fit of attempt 0 raised by itself within `within`
    seconds (`network_cut_problems`), and no namespace, link or /etc/netns entry was left.
    `restart_problems` checks the recovery."""
    problems = network_cut_problems(run, workers, within)
    if run.cut_at is None:
        problems.append("the driver never set the victim's link down")
    return problems + [f"left behind: {thing}" for thing in run.left_behind]
