"""Training scripts for fault injection (`python -m benchmarks.faults`, the tests).

Both run under `python -m launch.local` as `disttrain.testing.function_command`s:

- `checkpoint_train` trains a small model with ModelCheckpoint and EarlyStopping
  whose arguments the bad-input cases make wrong (monitor, filepath template,
  destination).
- `fault_train` trains with BackupAndRestore while, on attempt 0 only, the
  worker of rank `DISTTRAIN_FAULT_RANK` SIGKILLs itself after global step
  `DISTTRAIN_FAULT_STEP`; it records every finished epoch and its final weights
  under `result_dir`, so a test can compare a restarted job with an
  uninterrupted one. `run_fault_job` runs it under the launcher and collects
  what it left (benchmarks/faults.py and tests/launch/test_fault_injection.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal

import numpy as np

from disttrain.testing import LaunchedJob, function_command, run_launcher

ENV_FAULT_RANK = "DISTTRAIN_FAULT_RANK"
ENV_FAULT_STEP = "DISTTRAIN_FAULT_STEP"
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


def fault_train(result_dir: str, backup_dir: str, epochs: int = 4, width: int = 16) -> dict:
    """fit with BackupAndRestore(save_freq="epoch"); attempt 0 may SIGKILL one worker.

    Appends `<attempt> <epoch>` to `<result_dir>/epochs-<rank>.log` after every
    epoch, writes `<result_dir>/killed.json` just before the kill and, when fit
    returns, `<result_dir>/<rank>-<attempt>.json` with the epochs run and the
    final weights.
    """
    import keras

    from disttrain import callbacks, coordination

    attempt = int(os.environ.get("DISTTRAIN_ATTEMPT", "0"))
    victim = int(os.environ.get(ENV_FAULT_RANK, "-1"))
    kill_step = int(os.environ.get(ENV_FAULT_STEP, "0"))
    model = _model(width)
    model.build((None, 6))
    train, val = _datasets()
    rank = coordination.get().rank

    class KillAtStep(keras.callbacks.Callback):
        """SIGKILLs this process after global step `kill_step` (1-based) of attempt 0."""

        def on_train_batch_end(self, batch, logs=None):
            step = self._epoch * STEPS_PER_EPOCH + batch + 1
            if attempt == 0 and rank == victim and step == kill_step:
                _write_json(os.path.join(result_dir, "killed.json"),
                            {"rank": rank, "step": step, "pid": os.getpid()})
                os.kill(os.getpid(), signal.SIGKILL)

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            with open(os.path.join(result_dir, f"epochs-{rank}.log"), "a") as f:
                f.write(f"{attempt} {epoch}\n")

    history = model.fit(
        train, validation_data=val, epochs=epochs, verbose=0,
        callbacks=[callbacks.BackupAndRestore(backup_dir), KillAtStep(), callbacks.SyncStop()],
    )
    result = {"attempt": attempt, "epochs_run": len(history.history.get("loss", [])),
              "weights": [np.asarray(w).tolist() for w in model.get_weights()]}
    _write_json(os.path.join(result_dir, f"{rank}-{attempt}.json"), result)
    return result


def plan_fault(seed: int, workers: int, epochs: int) -> tuple[int, int]:
    """The (victim rank, global step from 1) that `seed` picks among `workers` x `epochs`."""
    rng = random.Random(seed)
    return rng.randrange(workers), rng.randint(1, epochs * STEPS_PER_EPOCH)


@dataclasses.dataclass
class FaultRun:
    """One `fault_train` job under `launch.local` and what its workers left in `result_dir`.

    Attributes:
        job: the launcher's exit, output and survivors.
        results: rank -> the `<rank>-<attempt>.json` of the last attempt that wrote one.
        epochs: rank -> the (attempt, epoch) pairs it finished, in order.
        killed: what the victim wrote just before it SIGKILLed itself, or None.
    """

    job: LaunchedJob
    results: dict[int, dict]
    epochs: dict[int, list[tuple[int, int]]]
    killed: dict | None


def run_fault_job(result_dir: str, workers: int, epochs: int, fault: tuple[int, int] | None,
                  max_restarts: int, timeout: float) -> FaultRun:
    """Runs `fault_train` on `workers` local workers; `fault` is (victim rank, step) or None.

    `result_dir` is created if needed and should be empty.
    """
    os.makedirs(result_dir, exist_ok=True)
    command = function_command(fault_train, {
        "result_dir": result_dir, "backup_dir": os.path.join(result_dir, "backup-{run_id}"),
        "epochs": epochs})
    env = {} if fault is None else {ENV_FAULT_RANK: str(fault[0]), ENV_FAULT_STEP: str(fault[1])}
    job = run_launcher(["--workers", str(workers), "--max-restarts", str(max_restarts),
                        "--grace", "1", "--", *command], timeout=timeout, env=env)
    results, finished = {}, {}
    for rank in range(workers):
        for attempt in range(max_restarts + 1):
            path = os.path.join(result_dir, f"{rank}-{attempt}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[rank] = json.load(f)
        log = os.path.join(result_dir, f"epochs-{rank}.log")
        with contextlib.suppress(FileNotFoundError), open(log) as f:
            finished[rank] = [tuple(map(int, line.split())) for line in f]
    killed_path = os.path.join(result_dir, "killed.json")
    killed = None
    if os.path.exists(killed_path):
        with open(killed_path) as f:
            killed = json.load(f)
    return FaultRun(job, results, finished, killed)


def max_weight_diff(a: list, b: list) -> float:
    """The largest absolute difference between two lists of weight arrays."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def restart_problems(run: FaultRun, fault: tuple[int, int], workers: int, epochs: int,
                     reference: list, tolerance: float = WEIGHT_TOLERANCE) -> list[str]:
    """What is wrong with a job that should have recovered from `fault` with one restart.

    Expected: exit 0 and no process left; the victim killed itself at the planned
    step of attempt 0; the launcher ran 2 attempts; every worker finished epochs
    0..k-1 on attempt 0 and k..epochs-1 on attempt 1, k being the epoch the kill
    interrupted; every worker ends with the same weights, within `tolerance` of
    `reference` (an uninterrupted run's).

    Returns:
        One line per problem; empty when the job recovered as expected.
    """
    victim, step = fault
    job = run.job
    if job.timed_out or job.returncode != 0:
        return [f"exit {job.returncode}" + (" (timed out)" if job.timed_out else "")]
    problems = []
    if job.survivors:
        problems.append(f"processes left: {job.survivors}")
    if run.killed is None or (run.killed["rank"], run.killed["step"]) != (victim, step):
        problems.append(f"no kill of rank {victim} at step {step}: {run.killed}")
    if "2 attempt(s) (1 restart(s))" not in job.stderr:
        problems.append("not exactly 2 attempts")
    killed_epoch = (step - 1) // STEPS_PER_EPOCH
    for rank in range(workers):
        finished = run.epochs.get(rank, [])
        first = [epoch for attempt, epoch in finished if attempt == 0]
        second = [epoch for attempt, epoch in finished if attempt == 1]
        if first != list(range(killed_epoch)) or second != list(range(killed_epoch, epochs)):
            problems.append(f"rank {rank} finished (attempt, epoch) {finished}, expected "
                            f"epochs 0..{killed_epoch - 1} then {killed_epoch}..{epochs - 1}")
        result = run.results.get(rank)
        if result is None or result["attempt"] != 1:
            problems.append(f"rank {rank} has no result of attempt 1: {result and result['attempt']}")
        elif result["epochs_run"] != epochs - killed_epoch:
            problems.append(f"rank {rank} ran {result['epochs_run']} epochs on attempt 1, "
                            f"expected {epochs - killed_epoch}")
    weights = [run.results[r]["weights"] for r in sorted(run.results)]
    if any(w != weights[0] for w in weights):
        problems.append("workers ended with different weights")
    if weights and max_weight_diff(weights[0], reference) > tolerance:
        problems.append(f"weights differ from the uninterrupted run by "
                        f"{max_weight_diff(weights[0], reference):.3g} > {tolerance:g}")
    return problems


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
