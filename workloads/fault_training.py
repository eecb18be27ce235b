"""A small training job that strikes one planned fault, and one whose callback arguments the
bad-input cases make wrong. Both run under `python -m launch.local` as
`disttrain.testing.function_command`s (`python -m benchmarks.faults`, the tests):

- `checkpoint_train` trains a small model with ModelCheckpoint and EarlyStopping
  whose arguments the bad-input cases make wrong (monitor, filepath template,
  destination).
- `fault_train` trains with BackupAndRestore and a ModelCheckpoint per epoch
  while, on attempt 0 only, one fault of kind `DISTTRAIN_FAULT_KIND` strikes
  (see `KINDS`): worker `DISTTRAIN_FAULT_RANK` SIGKILLs or SIGSTOPs itself after
  global step `DISTTRAIN_FAULT_STEP`, the chief SIGKILLs itself at its
  `DISTTRAIN_FAULT_STEP`-th rename into the backup or checkpoint directory
  (`DISTTRAIN_FAULT_WHEN`: just before or just after it), or the chief fills the
  checkpoint disk, or worker `DISTTRAIN_FAULT_RANK`, which joined the cgroup
  `DISTTRAIN_FAULT_CGROUP` before opening any socket, drops every packet it sends
  with an iptables rule matching that cgroup (`cut_rule`), or (storage-kill) the
  chief SIGKILLs the storage server (pid `DISTTRAIN_FAULT_STORAGE_PID`)
  `DISTTRAIN_FAULT_WHEN` seconds after the end of global step
  `DISTTRAIN_FAULT_STEP`, while that epoch's checkpoints are being uploaded, or
  (link-down: each worker a simulated pod in a network namespace of its own) worker
  `DISTTRAIN_FAULT_RANK` asks for its link to be cut after global step
  `DISTTRAIN_FAULT_STEP` and waits until it is down. It
  records every finished epoch and its final weights under `result_dir`, so a
  check can compare the job with an uninterrupted one
  (`benchmarks.fault_workloads` plans the faults, runs the jobs and checks them).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time

import numpy as np

ENV_FAULT_RANK = "DISTTRAIN_FAULT_RANK"
ENV_FAULT_STEP = "DISTTRAIN_FAULT_STEP"
ENV_FAULT_KIND = "DISTTRAIN_FAULT_KIND"
ENV_FAULT_WHEN = "DISTTRAIN_FAULT_WHEN"
ENV_FAULT_CGROUP = "DISTTRAIN_FAULT_CGROUP"
WORKER_KILL = "worker-kill"
CHIEF_KILL_COMMIT = "chief-kill-commit"
CHIEF_KILL_BACKUP = "chief-kill-backup"
WORKER_STOP = "worker-stop"
DISK_FULL = "disk-full"
NETWORK_CUT = "network-cut"
STORAGE_KILL = "storage-kill"
LINK_DOWN = "link-down"
# The storage-kill fault: the pid of the GCS emulator the chief SIGKILLs.
ENV_STORAGE_PID = "DISTTRAIN_FAULT_STORAGE_PID"
# What each kind does on attempt 0 (the fault is planned by `plan_fault`).
KINDS = {
    WORKER_KILL: "a random worker SIGKILLs itself after a random step",
    CHIEF_KILL_COMMIT: "the chief SIGKILLs itself just before or after a random rename of a "
                       "ModelCheckpoint commit",
    CHIEF_KILL_BACKUP: "the chief SIGKILLs itself just before or after a random rename of a "
                       "BackupAndRestore commit",
    WORKER_STOP: "a random worker SIGSTOPs itself (frozen, never continued) after a random step",
    DISK_FULL: "the chief fills the checkpoint disk (a small tmpfs) after a random step",
    NETWORK_CUT: "a random worker is cut off the network (every packet it sends dropped) "
                 "after a random step",
    STORAGE_KILL: "the chief SIGKILLs the GCS emulator holding the gs:// checkpoints a random "
                  "delay into a random epoch's saves; the driver restarts it",
    LINK_DOWN: "the workers are pods, each in a network namespace of its own; a random pod's "
               "link is set down after a random step",
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
    `<result_dir>/renames-<attempt>.json`, `<result_dir>/failed-<rank>-<attempt>.json`
    (the time) when fit raises and, when fit returns,
    `<result_dir>/<rank>-<attempt>.json` with the epochs run and the final weights.
    """
    import keras

    from disttrain import callbacks, coordination
    from disttrain.cluster import Cluster

    attempt = int(os.environ.get("DISTTRAIN_ATTEMPT", "0"))
    kind = os.environ.get(ENV_FAULT_KIND, WORKER_KILL)
    victim = int(os.environ.get(ENV_FAULT_RANK, "-1"))
    fault_step = int(os.environ.get(ENV_FAULT_STEP, "0"))
    if kind == NETWORK_CUT and attempt == 0 and Cluster.from_env().worker_rank == victim:
        # Before the strategy opens any socket: a socket keeps its creator's cgroup.
        with open(os.path.join(os.environ[ENV_FAULT_CGROUP], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    model = _model(width)
    model.build((None, 6))
    train, val = _datasets()
    rank = coordination.get().rank
    armed = attempt == 0 and rank == victim

    def strike(**details) -> None:
        write_json(os.path.join(result_dir, "fault.json"),
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
            write_json(os.path.join(result_dir, f"began-{rank}-{attempt}.json"),
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
            elif kind == NETWORK_CUT:
                strike(step=step)
                subprocess.run(["iptables", "-w", "-I", *cut_rule(os.environ[ENV_FAULT_CGROUP])],
                               check=True)
            elif kind == LINK_DOWN:
                strike(step=step)
                _wait_for_link_down(LINK_DOWN_WITHIN)

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            with open(os.path.join(result_dir, f"epochs-{rank}.log"), "a") as f:
                f.write(f"{attempt} {epoch}\n")

    class KillStorageMidSave(keras.callbacks.Callback):
        """Starts the storage-kill timer before the epoch's saves (first in the stack)."""

        def on_epoch_end(self, epoch, logs=None):
            if not armed or kind != STORAGE_KILL or (epoch + 1) * STEPS_PER_EPOCH != fault_step:
                return
            delay = float(os.environ.get(ENV_FAULT_WHEN, "0"))

            def kill() -> None:
                strike(step=fault_step, when=delay)
                os.kill(int(os.environ[ENV_STORAGE_PID]), signal.SIGKILL)

            threading.Timer(delay, kill).start()

    stack = [KillStorageMidSave(), callbacks.BackupAndRestore(backup_dir), FaultAtStep(),
             callbacks.SyncStop()]
    if checkpoint_dir is not None:
        stack.insert(1, callbacks.ModelCheckpoint(os.path.join(checkpoint_dir, CHECKPOINT_NAME),
                                                  save_weights_only=True))
    try:
        history = model.fit(train, validation_data=val, epochs=epochs, verbose=0,
                            callbacks=stack)
    except Exception:
        write_json(os.path.join(result_dir, f"failed-{rank}-{attempt}.json"),
                   {"time": time.time()})
        raise
    if rank == 0:
        write_json(os.path.join(result_dir, f"renames-{attempt}.json"), renames)
    result = {"attempt": attempt, "epochs_run": len(history.history.get("loss", [])),
              "weights": [np.asarray(w).tolist() for w in model.get_weights()]}
    write_json(os.path.join(result_dir, f"{rank}-{attempt}.json"), result)
    return result


def cut_rule(cgroup: str) -> list[str]:
    """The iptables rule (chain and match) dropping every packet sent by a process of
    `cgroup`, a directory directly under the cgroup v2 root."""
    return ["OUTPUT", "-m", "cgroup", "--path", os.path.basename(cgroup), "-j", "DROP"]


# How long a link-down victim waits, after asking, for the driver to set its link down.
LINK_DOWN_WITHIN = 30.0


def _wait_for_link_down(within: float) -> None:
    """Waits until no network interface of this process's namespace but loopback is up (the
    driver, seeing `fault.json`, sets the pod's link down from the bridge's side), so that
    nothing runs past the planned step before the cut.

    Raises:
        RuntimeError: an interface was still up after `within` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        up = []
        for name in os.listdir("/sys/class/net"):
            with open(f"/sys/class/net/{name}/operstate") as f:
                if name != "lo" and f.read().strip() == "up":
                    up.append(name)
        if not up:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"link-down: {up} still up {within:g}s after fault.json was "
                               "written: is the job running as pods under the link-down driver?")
        time.sleep(0.01)


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


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
