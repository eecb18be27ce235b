"""`disttrain.strategy()`: the distribution strategy for this process, with Keras 3 fixed.

The module is `disttrain.distribute`, not `disttrain.strategy`: importing a
submodule binds it on its package, and a module named `strategy` would replace
the function `disttrain.strategy` (then "'module' object is not callable").

One call gives every script the right strategy: `MultiWorkerMirroredStrategy`
when TF_CONFIG describes more than one training task, or when no TF_CONFIG is
given and the launcher started several tasks (a Slurm step, `mpirun`: see
`disttrain.cluster.launcher_env.derive_from_launcher`; a launcher whose cluster cannot be
derived is refused before any training), TensorFlow's default strategy
otherwise (a single process, or the evaluator task), except that one process
that sees several GPUs gets a `MirroredStrategy` over them (`local_devices`).
TF_CONFIG is
validated by `disttrain.cluster` first, so a typo fails with a message that
names it instead of deep inside TensorFlow. The Keras 3 fixes of
`disttrain.keras_compat` are applied before the strategy is returned.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from disttrain._tf import require_tensorflow
from disttrain.cluster import Cluster
from disttrain.errors import StrategyError

require_tensorflow("disttrain.strategy()")

from disttrain import coordination, keras_compat  # noqa: E402
from disttrain.coordination import liveness  # noqa: E402
from disttrain.keras_compat import gradient_compression as gradient_compression_module  # noqa: E402
from disttrain.keras_compat import step_timing_recorder  # noqa: E402
from disttrain.report import step_timing  # noqa: E402

IMPLEMENTATIONS = ("auto", "ring", "nccl")
LOCAL_DEVICES = ("all", "one")

_lock = threading.Lock()
_created: tuple[tuple[Any, ...], Any] | None = None


def strategy(
    implementation: str = "auto",
    timeout_seconds: float | None = None,
    quiet_workers: bool = True,
    gradient_compression: str = "none",
    local_devices: str | Sequence[str] = "all",
):
    """Returns the process's distribution strategy, creating it on first call.

    TensorFlow allows one `MultiWorkerMirroredStrategy` per process, so later
    calls return the same object; calling again with different options is an
    error rather than a silent surprise.

    Args:
        implementation: collective implementation, `"auto"`, `"ring"` (gRPC) or
            `"nccl"` (GPUs).
        timeout_seconds: optional timeout for each collective; a peer that stops
            answering then raises `DeadlineExceededError` instead of hanging.
            TensorFlow spends a thread per collective on this, so it is off by
            default (a peer that exits is still detected within seconds).
        quiet_workers: on every training task but the chief, send Keras's own console
            output (progress bars, `model.summary()`, callback messages) to absl
            logging instead of stdout (`keras.config.disable_interactive_logging()`),
            so a job prints one progress bar, the chief's, under the launcher and
            in `kubectl logs` alike. `print()`, warnings and errors are untouched.
            False keeps Keras's output on every worker. Read on the first call.
        gradient_compression: "none" (default), "bf16" or "fp16": all-reduce the
            float32 gradients in 16 bits, halving the bytes each step sends
            (`disttrain.keras_compat.gradient_compression`). It changes the results (the sum
            is rounded to 16 bits), so it is off unless asked for; it pays when
            the gradient all-reduce dominates the step (large models, many
            workers, slow networks).
        local_devices: the devices of this process that hold a replica.
            `"all"` (default): every visible GPU; one process that sees more
            than one gets a `tf.distribute.MirroredStrategy` over them, and each
            worker of a multi-worker cluster contributes all of its GPUs (so
            `num_replicas_in_sync` is workers × GPUs). `"one"`: one device per
            process (TensorFlow's default strategy, or one GPU per worker), e.g.
            when each process is given its own GPU. A list of device names
            (`["/gpu:0", "/gpu:2"]`, or logical CPUs made with
            `tf.config.set_logical_device_configuration`) gives one process a
            `MirroredStrategy` over exactly those; not with multi-worker
            clusters, where TensorFlow places each worker's replicas on its GPUs
            itself. `implementation` and `timeout_seconds` concern the
            multi-worker collectives only.

    Returns:
        A `tf.distribute.MultiWorkerMirroredStrategy` for multi-worker clusters,
        a `tf.distribute.MirroredStrategy` for one process with several local
        devices, else `tf.distribute.get_strategy()` (also on the evaluator task,
        which never joins the training group). Every training task also agrees on the run id
        here (`coordination.get().run_id()`), at a point they all reach, and starts
        a `disttrain.coordination.liveness.StallWatch`: a peer that is alive but stuck outside
        training for `DISTTRAIN_COORDINATION_TIMEOUT` seconds is named and the job
        fails instead of hanging (a dead or frozen peer is reported by TensorFlow's
        coordination service within seconds). SIGTERM terminates the worker
        again (TensorFlow's coordination agent makes it ignore SIGTERM).

    Raises:
        ClusterConfigError: TF_CONFIG is malformed, or this process is one of several
            tasks (Slurm, MPI, torchrun-style variables) whose cluster cannot be derived.
        StrategyError: bad options, options differing from the first call, or
            this task cannot listen on its address.

    Example:

    ```python
    strategy = disttrain.strategy()
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    ```
    """
    global _created
    if implementation not in IMPLEMENTATIONS:
        raise StrategyError(
            f"implementation={implementation!r} is not supported. Fix: use one of "
            f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}."
        )
    if timeout_seconds is not None and not timeout_seconds > 0:
        raise StrategyError(
            f"timeout_seconds={timeout_seconds!r} must be a positive number of seconds "
            "or None. Fix: pass e.g. timeout_seconds=300, or leave it out."
        )
    gradient_compression_module.check(gradient_compression)
    cluster = Cluster.from_env()
    devices = _check_local_devices(local_devices, cluster)
    key = (implementation, timeout_seconds, cluster.to_tf_config(), gradient_compression,
           devices)
    with _lock:
        if _created is not None:
            first_key, created = _created
            if first_key != key:
                raise StrategyError(
                    f"disttrain.strategy() was already created with implementation="
                    f"{first_key[0]!r}, timeout_seconds={first_key[1]!r}, gradient_compression="
                    f"{first_key[3]!r}, local_devices={first_key[4]!r} for task "
                    f"{first_key[2]['task']}; now asked for "
                    f"implementation={implementation!r}, timeout_seconds={timeout_seconds!r}, "
                    f"gradient_compression={gradient_compression!r}, local_devices={devices!r} "
                    f"for task {key[2]['task']}. TensorFlow "
                    "allows one multi-worker strategy per process. Fix: call "
                    "disttrain.strategy() once with the options you need and reuse it."
                )
            return created
        keras_compat.apply()
        gradient_compression_module.install(gradient_compression)
        created = _create(cluster, implementation, timeout_seconds, devices)
        if (quiet_workers and cluster.is_multi_worker and not cluster.is_chief
                and not cluster.is_evaluator):
            import keras

            keras.config.disable_interactive_logging()
        timing_file = os.environ.get(step_timing.ENV_TIMING_FILE)
        if timing_file and not cluster.is_evaluator:
            step_timing_recorder.install(timing_file)
        _created = (key, created)
        if cluster.is_evaluator:
            return created
        coordination.get().run_id()
        if cluster.is_multi_worker:
            _terminate_on_sigterm_again()
            liveness.StallWatch(coordination.get()).start()
        return created


def _terminate_on_sigterm_again() -> None:
    """Undoes the SIGTERM handler TensorFlow's coordination agent installs in C++.

    With it, a worker ignores SIGTERM (measured with TF 2.21: alive 5 s after a
    SIGTERM), so `kubectl delete` or a launcher's stop waits for SIGKILL. Python
    still reports the default disposition, so a handler set by the script itself
    is kept. `BackupAndRestore` installs its own handler during `fit`.
    """
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_local_devices(local_devices: str | Sequence[str],
                         cluster: Cluster) -> str | tuple[str, ...]:
    """`local_devices` validated: `"all"`, `"one"` or a tuple of device names."""
    if isinstance(local_devices, str):
        if local_devices in LOCAL_DEVICES:
            return local_devices
    elif (isinstance(local_devices, list | tuple) and local_devices
          and all(isinstance(d, str) and d for d in local_devices)):
        if cluster.is_multi_worker and not cluster.is_evaluator:
            raise StrategyError(
                f"local_devices={list(local_devices)!r} with a {cluster.num_workers}-worker "
                f"cluster ({cluster.source}): MultiWorkerMirroredStrategy places each worker's "
                "replicas on its GPUs itself. Fix: use local_devices='all' (every visible GPU) "
                "or 'one', and choose the GPUs with CUDA_VISIBLE_DEVICES.")
        return tuple(local_devices)
    raise StrategyError(
        f"local_devices={local_devices!r} is not supported. Fix: use 'all' (every visible "
        "GPU, the default), 'one' (one device per process) or a list of device names such "
        "as ['/gpu:0', '/gpu:1'].")


def _create(cluster: Cluster, implementation: str, timeout_seconds: float | None,
            devices: str | tuple[str, ...]):
    import tensorflow as tf

    gpus = len(tf.config.get_visible_devices("GPU"))
    if cluster.is_evaluator:
        return tf.distribute.get_strategy()
    if not cluster.is_multi_worker:
        if isinstance(devices, tuple):
            return tf.distribute.MirroredStrategy(list(devices))
        if devices == "all" and gpus > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation={
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[implementation],
        timeout_seconds=timeout_seconds,
    )
    # TensorFlow gets the training view of TF_CONFIG, whatever shape the platform wrote
    # (a TFJob evaluator listed in the cluster, `master` for the chief: see disttrain.cluster).
    # Unlike TF_CONFIG's resolver this one does not count GPUs itself: it is told.
    view = cluster.to_tf_config()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(view["cluster"]), task_type=view["task"]["type"],
        task_id=view["task"]["index"], rpc_layer="grpc",
        num_accelerators={"GPU": min(gpus, 1) if devices == "one" else gpus})
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options)
    except tf.errors.UnknownError as e:
        if "Could not start gRPC server" not in str(e):
            raise
        address = cluster.training_addresses[cluster.worker_rank]
        fix = ("give this task a free port on one of its own addresses (python -m launch.local "
               "picks free ports itself)")
        if cluster.source.startswith("Slurm"):
            fix = ("let Slurm reserve the step's ports (srun --resv-ports, with MpiParams=ports="
                   "12000-12999 in slurm.conf), or set TF_CONFIG (docs/slurm.md)")
        raise StrategyError(
            f"{cluster.label} could not listen on its {cluster.source} address {address} "
            "(TensorFlow: Could not start gRPC server): the port is taken, or the host is not "
            f"an address of this machine. Fix: {fix}."
        ) from e
