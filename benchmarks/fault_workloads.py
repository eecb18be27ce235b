"""Training scripts for fault injection (`python -m benchmarks.faults`, the tests).

Both run under `python -m launch.local` as `disttrain.testing.function_command`s:

- `checkpoint_train` trains a small model with ModelCheckpoint and EarlyStopping
  whose arguments the bad-input cases make wrong (monitor, filepath template,
  destination).
- `fault_train` trains with BackupAndRestore and a ModelCheckpoint per epoch
  while, on attempt 0 only, one fault of kind `DISTTRAIN_FAULT_KIND` strikes
  (see `KINDS`): worker `DISTTRAIN_FAULT_RANK` SIGKILLs or SIGSTOPs itself after
  global step `DISTTRAIN_FAULT_STEP`, the chief SIGKILLs itself at its
  `DISTTRAIN_FAULT_STEP`-th rename into the backup or checkpoint directory
  (`DISTTRAIN_FAULT_WHEN`: just before or just after it), or the chief fills the
  checkpoint disk. It records every finished epoch and its final weights under
  `result_dir`, so a check can compare the job with an uninterrupted one.
  `run_fault_job` runs it under the launcher and collects what it left
  (benchmarks/faults.py and tests/launch/test_fault_injection.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import time

import numpy as np

from disttrain.testing import LaunchedJob, function_command, run_launcher

ENV_FAULT_RANK = "DISTTRAIN_FAULT_RANK"
ENV_FAULT_STEP = "DISTTRAIN_FAULT_STEP"
ENV_FAULT_KIND = "DISTTRAIN_FAULT_KIND"
ENV_FAULT_WHEN = "DISTTRAIN_FAULT_WHEN"
WORKER_KILL = "worker-kill"
CHIEF_KILL_COMMIT = "chief-kill-commit"
CHIEF_KILL_BACKUP = "chief-kill-backup"
WORKER_STOP = "worker-stop"
DISK_FULL = "disk-full"
# What each kind does on attempt 0 (the fault is planned by `plan_fault`).
KINDS = {
    WORKER_KILL: "a random worker SIGKILLs itself after a random step",
    CHIEF_KILL_COMMIT: "the chief SIGKILLs itself just before or after a random rename of a "
                       "ModelCheckpoint commit",
    CHIEF_KILL_BACKUP: "the chief SIGKILLs itself just before or after a random rename of a "
                       "BackupAndRestore commit",
    WORKER_STOP: "a random worker SIGSTOPs itself (frozen, never continued) after a random step",
    DISK_FULL: "the chief fills the checkpoint disk (a small tmpfs) after a random step",
}
# The directories (under result_dir) whose renames the chief-kill kinds count.
RENAMES_UNDER = {CHIEF_KILL_BACKUP: "backup-", CHIEF_KILL_COMMIT: "checkpoints"}
CHECKPOINT_NAME = "model-{epoch:02d}.weights.h5"
FILLER_NAME = "filler.bin"
SAMPLES = 192
GLOBAL_BATCH = 32
STEPS_PER_EPOCH = SAMPLES // GLOBAL_BATCH
WEIGHT_TOLERANCE = 1e-5


def _datasets():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = (x[:, 0] - x[:, 1] > 0).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    val = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(GLOBAL_BATCH)
    return train, val


def _model(width: int):
    """Two hidden layers of `width` units: its checkpoint takes about 4 * width**2 bytes."""
    import keras

    from disttrain.distribute import strategy as make_strategy

    with make_strategy().scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", metrics=["accuracy"])
    return model


def checkpoint_train(filepath: str, epochs: int = 3, monitor: str = "val_loss",
                     save_best_only: bool = True, width: int = 64,
                     hold_port_of_rank: int | None = None) -> dict:
    """fit with ModelCheckpoint(filepath, monitor, save_best_only), EarlyStopping and SyncStop.

    With `hold_port_of_rank`, that worker first listens on its own TF_CONFIG port
    itself, as another program holding the port would.
    """
    import socket

    from disttrain import callbacks
    from disttrain.cluster import Cluster

    cluster = Cluster.from_env()
    held = None
    if hold_port_of_rank is not None and cluster.worker_rank == hold_port_of_rank:
        port = int(cluster.training_addresses[cluster.worker_rank].rsplit(":", 1)[1])
        held = socket.socket()
        held.bind(("0.0.0.0", port))
        held.listen()
    model = _model(width)
    train, val = _datasets()
    stack = [
        callbacks.ModelCheckpoint(filepath, monitor=monitor, save_best_only=save_best_only),
        callbacks.EarlyStopping(monitor=monitor, patience=epochs),
        callbacks.SyncStop(),
    ]
    history = model.fit(train, validation_data=val, epochs=epochs, callbacks=stack, verbose=0)
    return {"epochs_run": len(history.history["loss"])}


def fault_train(result_dir: str, backup_dir: str, checkpoint_dir: str | None = None,
                epochs: int = 4, width: int = 16) -> dict:
    """fit with BackupAndRestore (and, given `checkpoint_dir`, a ModelCheckpoint per epoch
    there); attempt 0 may meet a fault.

    Appends `<attempt> <epoch>` to `<result_dir>/epochs-<rank>.log` after every
    epoch, writes `<result_dir>/began-<rank>-<attempt>.json` (the time) when fit
    starts, `<result_dir>/fault.json` just before the fault strikes, the chief's
    count of renames under each `RENAMES_UNDER` directory to
    `<result_dir>/renames-<attempt>.json` and, when fit returns,
    `<result_dir>/<rank>-<attempt>.json` with the epochs run and the final weights.
    """
    import keras

    from disttrain import callbacks, coordination

    attempt = int(os.environ.get("DISTTRAIN_ATTEMPT", "0"))
    kind = os.environ.get(ENV_FAULT_KIND, WORKER_KILL)
    victim = int(os.environ.get(ENV_FAULT_RANK, "-1"))
    fault_step = int(os.environ.get(ENV_FAULT_STEP, "0"))
    model = _model(width)
    model.build((None, 6))
    train, val = _datasets()
    rank = coordination.get().rank
    armed = attempt == 0 and rank == victim

    def strike(**details) -> None:
        _write_json(os.path.join(result_dir, "fault.json"),
                    {"kind": kind, "rank": rank, "time": time.time(), "pid": os.getpid(),
                     **details})

    renames = {name: 0 for name in RENAMES_UNDER.values()}
    if rank == 0:
        replace = os.replace

        def counting_replace(src, dst, *args, **kwargs):
            relative = os.path.relpath(os.fspath(dst), result_dir)
            counted = [name for name in renames if relative.startswith(name)]
            for name in counted:
                renames[name] += 1
            target = RENAMES_UNDER.get(kind)
            strikes = armed and target in counted and renames[target] == fault_step
            when = os.environ.get(ENV_FAULT_WHEN, "before")
            if strikes and when == "before":
                strike(step=fault_step, when=when, path=os.fspath(dst))
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst, *args, **kwargs)
            if strikes:
                strike(step=fault_step, when=when, path=os.fspath(dst))
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = counting_replace

    class FaultAtStep(keras.callbacks.Callback):
        """Strikes the step faults after global step `fault_step` (1-based) of attempt 0."""

        def on_train_begin(self, logs=None):
            _write_json(os.path.join(result_dir, f"began-{rank}-{attempt}.json"),
                        {"time": time.time()})

        def on_train_batch_end(self, batch, logs=None):
            step = self._epoch * STEPS_PER_EPOCH + batch + 1
            if not armed or step != fault_step:
                return
            if kind == WORKER_KILL:
                strike(step=step)
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == WORKER_STOP:
                strike(step=step)
                os.kill(os.getpid(), signal.SIGSTOP)
            elif kind == DISK_FULL:
                strike(step=step, free=_fill(os.path.join(checkpoint_dir, FILLER_NAME)))

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            with open(os.path.join(result_dir, f"epochs-{rank}.log"), "a") as f:
                f.write(f"{attempt} {epoch}\n")

    stack = [callbacks.BackupAndRestore(backup_dir), FaultAtStep(), callbacks.SyncStop()]
    if checkpoint_dir is not None:
        stack.insert(0, callbacks.ModelCheckpoint(os.path.join(checkpoint_dir, CHECKPOINT_NAME),
                                                  save_weights_only=True))
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=stack)
    if rank == 0:
        _write_json(os.path.join(result_dir, f"renames-{attempt}.json"), renames)
    result = {"attempt": attempt, "epochs_run": len(history.history.get("loss", [])),
              "weights": [np.asarray(w).tolist() for w in model.get_weights()]}
    _write_json(os.path.join(result_dir, f"{rank}-{attempt}.json"), result)
    return result


def _fill(path: str) -> int:
    """Writes `path` until its disk is full; returns the bytes it wrote."""
    written = 0
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return written


@dataclasses.dataclass(frozen=True)
class Fault:
    """One planned fault: its kind, the rank it strikes, when, and (renames) before or after.

    `step` is a global step from 1 for the step kinds, the number (from 1) of
    the rename into the kind's directory for the chief-kill kinds.
    """

    kind: str
    rank: int
    step: int
    when: str = "before"

    def env(self) -> dict[str, str]:
        """The environment that makes `fault_train` strike this fault."""
        return {ENV_FAULT_KIND: self.kind, ENV_FAULT_RANK: str(self.rank),
                ENV_FAULT_STEP: str(self.step), ENV_FAULT_WHEN: self.when}

    def describe(self) -> str:
        """e.g. `w1 step 7` or `w0 rename 3 after`."""
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
    if kind in (WORKER_KILL, WORKER_STOP):
        return Fault(kind, rng.randrange(workers), rng.randint(1, epochs * STEPS_PER_EPOCH))
    if kind == DISK_FULL:
        return Fault(kind, 0, rng.randint(1, epochs * STEPS_PER_EPOCH))
    if kind in RENAMES_UNDER:
        total = (renames or {}).get(RENAMES_UNDER[kind], 0)
        if total < 1:
            raise ValueError(f"plan_fault({kind!r}) needs the rename counts of an "
                             f"uninterrupted run, got {renames!r}")
        return Fault(kind, 0, rng.randint(1, total), rng.choice(["before", "after"]))
    raise ValueError(f"unknown fault kind {kind!r}; choose one of {sorted(KINDS)}")


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


def run_fault_job(result_dir: str, workers: int, epochs: int, fault: Fault | None,
                  max_restarts: int, timeout: float) -> FaultRun:
    """Runs `fault_train` on `workers` local workers, striking `fault` (None: no fault).

    `result_dir` is created if needed and should be empty. For `DISK_FULL` the
    checkpoint directory is a 1 MiB tmpfs mounted for the job (needs root).
    """
    os.makedirs(result_dir, exist_ok=True)
    checkpoint_dir = os.path.join(result_dir, "checkpoints")
    os.makedirs(checkpoint_dir)
    command = function_command(fault_train, {
        "result_dir": result_dir, "backup_dir": os.path.join(result_dir, "backup-{run_id}"),
        "checkpoint_dir": checkpoint_dir, "epochs": epochs})
    mounted = fault is not None and fault.kind == DISK_FULL
    if mounted:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", checkpoint_dir],
                       check=True)
    try:
        job = run_launcher(["--workers", str(workers), "--max-restarts", str(max_restarts),
                            "--grace", "1", "--", *command], timeout=timeout,
                           env={} if fault is None else fault.env())
        found = storage_problems(result_dir)
        index = _read_json(os.path.join(checkpoint_dir, "best.json")) or {}
        listed = [os.path.basename(r["path"]) for r in index.get("checkpoints", [])]
    finally:
        if mounted:
            subprocess.run(["umount", checkpoint_dir], check=True)
    results, finished, began = {}, {}, {}
    for rank in range(workers):
        for attempt in range(max_restarts + 1):
            result = _read_json(os.path.join(result_dir, f"{rank}-{attempt}.json"))
            if result is not None:
                results[rank] = result
            start = _read_json(os.path.join(result_dir, f"began-{rank}-{attempt}.json"))
            if start is not None:
                began[rank, attempt] = start["time"]
        log = os.path.join(result_dir, f"epochs-{rank}.log")
        with contextlib.suppress(FileNotFoundError), open(log) as f:
            finished[rank] = [tuple(map(int, line.split())) for line in f]
    renames = {}
    for attempt in range(max_restarts + 1):
        renames = _read_json(os.path.join(result_dir, f"renames-{attempt}.json")) or renames
    return FaultRun(job, results, finished, _read_json(os.path.join(result_dir, "fault.json")),
                    began, renames, checkpoint_dir, found, listed)


def storage_problems(result_dir: str) -> list[str]:
    """What a reader of the job's checkpoint and backup directories could trip on.

    No temp file or write probe left; every directory with a manifest holds
    exactly the files it lists with their sizes and checksums; every file an
    index (`*.json` with `checkpoints`) lists exists and opens as HDF5; no other
    checkpoint file is visible (a half-written one would be).
    """
    import h5py

    from disttrain import storage

    problems = []
    for directory, _, names in os.walk(result_dir):
        if not (os.path.basename(directory).startswith("backup")
                or directory.startswith(os.path.join(result_dir, "checkpoints"))):
            continue
        for name in names:
            if ".tmp-" in name or name.startswith(storage.PROBE_PREFIX):
                problems.append(f"left behind: {os.path.join(directory, name)}")
        if storage.MANIFEST_NAME in names:
            problem = storage.check_files(directory)
            if problem:
                problems.append(f"damaged commit: {problem}")
        listed = set()
        for name in names:
            index = _read_json(os.path.join(directory, name)) if name.endswith(".json") else None
            for record in (index or {}).get("checkpoints", []) if isinstance(index, dict) else []:
                listed.add(os.path.basename(record["path"]))
                try:
                    with h5py.File(record["path"], "r"):
                        pass
                except OSError as e:
                    problems.append(f"index {name} lists {record['path']}, unreadable: {e}")
        for name in names:
            in_checkpoints = directory.startswith(os.path.join(result_dir, "checkpoints"))
            if name.endswith(".h5") and in_checkpoints and name not in listed:
                problems.append(f"unlisted checkpoint visible: {os.path.join(directory, name)}")
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


def restart_seconds(run: FaultRun) -> float | None:
    """Seconds from the fault to the first worker of attempt 1 starting fit, or None."""
    restarted = [t for (_, attempt), t in run.began.items() if attempt == 1]
    if run.fault is None or not restarted:
        return None
    return min(restarted) - run.fault["time"]


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return json.load(f)
    return None
