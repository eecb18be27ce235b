"""Preflight: one report of configuration mistakes before the first step of a multi-worker call.

Run by `disttrain.keras_compat.call_checks` at the start of `fit`, `evaluate` and
`predict` under multi-worker training, before the input check (not a fix of
Keras code). Each worker inspects its
own inputs and settings, the workers exchange what they found in one
`disttrain.coordination` gather, and every worker reaches the same verdict:

- errors (certainly wrong; `PreflightError` on every worker, nothing trained):
  a `fit` of a model built outside any strategy's scope on a multi-worker cluster
  (each worker would train alone; decided locally, before the exchange); a global
  batch smaller than the number of replicas; an optimizer option Keras
  cannot run under a distribution strategy (`gradient_accumulation_steps`,
  `ema_overwrite_frequency`); `steps_per_epoch` larger
  than the input's batches; an input sharded by file (AUTO with a file reader,
  or FILE) with fewer files than workers, which TensorFlow refuses at the first
  step with a confusing error; a `cache(filename)` that workers of one host would
  share; a model dtype policy that differs between workers;
- warnings (they cost accuracy or time; one `PreflightWarning` on the chief):
  a global batch not divisible by the replicas; an input that runs out before
  the last epoch; an AUTO-sharded input TensorFlow cannot split by file whose
  pipeline does per-element work (every worker then does all of it and keeps
  1/N); more compute threads than cores on a host.

`DISTTRAIN_PREFLIGHT=0` on every worker, or `keras_compat.apply(skip=("preflight",))`,
turns it off.
See `docs/keras_compat.md#preflight`.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from disttrain.errors import CoordinationError, PreflightError, PreflightWarning
from disttrain.keras_compat import detection, pipeline

NAME = "preflight"
ENV_DISABLE = "DISTTRAIN_PREFLIGHT"
"""Set to `0` to skip the preflight (it must then be `0` on every worker)."""

_PER_ELEMENT_WORK = ("Map", "Interleave", "Generator", "Filter", "Scan")


def run(model: Any, call: str, arguments: Mapping[str, Any]) -> None:
    """Checks the configuration of `call` on every worker; raises or warns once.

    Args:
        model: the model about to run.
        call: `"fit"`, `"evaluate"` or `"predict"`.
        arguments: the call's bound arguments (`x`, `batch_size`, `epochs`,
            `steps_per_epoch`, `validation_data`, `initial_epoch`, ...).

    Raises:
        PreflightError: on every worker, when any worker found a certain mistake.
    """
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return
    strategy = model.distribute_strategy
    if call == "fit":
        _refuse_training_alone(strategy)
    if not detection.is_multi_worker(strategy):
        return
    from disttrain import coordination

    coord = coordination.get()
    local = facts(model, call, arguments, strategy.num_replicas_in_sync, coord.num_workers)
    try:
        gathered = coord.gather(f"keras_compat.preflight.{call}",
                                json.dumps(local, sort_keys=True))
    except CoordinationError as e:
        raise CoordinationError(
            f"{e} Under multi-worker training `{call}` is a collective call: every worker "
            "must make it, in the same order. Fix: if only some workers call it (e.g. under "
            f"`if cluster.is_chief`), call it on every worker; to {call} on one worker only, "
            "use a model built outside the strategy's scope (keras.models.clone_model, then "
            "set_weights)."
        ) from e
    peers = [json.loads(v) for v in gathered]
    errors, notes = verdict(peers)
    if errors:
        raise PreflightError(f"{call}: preflight found {len(errors)} problem(s) that make this "
                             "run wrong:\n- " + "\n- ".join(errors))
    if notes and coord.is_chief:
        warnings.warn(f"{call}: preflight found {len(notes)} configuration problem(s) that "
                      "cost accuracy or time:\n- " + "\n- ".join(notes), PreflightWarning,
                      stacklevel=4)


def _refuse_training_alone(strategy: Any) -> None:
    """Raises when a training task of a multi-worker cluster fits a model built outside any
    strategy's scope: each worker would train its own copy alone (measured: 2 workers ended
    with different weights, exit 0)."""
    import tensorflow as tf

    from disttrain.cluster import Cluster

    if tf.distribute.has_strategy() or strategy is not tf.distribute.get_strategy():
        return
    cluster = Cluster.from_env()
    if not cluster.is_multi_worker or cluster.is_evaluator:
        return
    raise PreflightError(
        f"fit: the model was built outside strategy.scope(), so on this cluster of "
        f"{cluster.num_workers} workers (TF_CONFIG) each worker would train its own copy "
        "alone, with no gradients exchanged: separate trainings, not one. Fix: build and "
        "compile the model inside `with strategy.scope():` (strategy = disttrain.strategy()). "
        "To train a model on this worker alone on purpose, build it inside "
        "`with tf.distribute.OneDeviceStrategy('/cpu:0').scope():`."
    )


def facts(model: Any, call: str, arguments: Mapping[str, Any], replicas: int,
          workers: int) -> dict[str, Any]:
    """What this worker knows: its host, cores, threads, dtype policy, and what its
    inputs say (`errors`, `notes`)."""
    import tensorflow as tf

    errors: list[str] = []
    notes: list[str] = []
    x = arguments.get("x")
    if call == "fit":  # evaluate and predict count every sample however batches split
        _check_optimizer(getattr(model, "optimizer", None), errors)
        _check_batch(x, arguments.get("batch_size"), replicas, errors, notes)
        _check_steps(x, arguments, errors, notes)
    caches: dict[str, list[str]] = {}
    for name in ("x", "validation_data"):
        value = arguments.get(name)
        if isinstance(value, tf.data.Dataset):
            _check_sharding(name, value, workers, errors, notes)
            if files := pipeline.cache_files(value):
                caches[name] = files
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": socket.gethostname(), "cores": cores or 1,
        "threads": configured or int(os.environ.get("TF_NUM_INTRAOP_THREADS") or 0) or cores,
        "dtype": model.dtype_policy.name, "errors": errors, "notes": notes, "caches": caches,
    }


def verdict(peers: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(errors, warnings) from every worker's `facts`, in rank order; the same on every
    worker."""
    errors = _unique(e for p in peers for e in p["errors"])
    notes = _unique(n for p in peers for n in p["notes"])
    dtypes = [p["dtype"] for p in peers]
    if len(set(dtypes)) > 1:
        listed = ", ".join(f"worker {rank}: {d}" for rank, d in enumerate(dtypes))
        errors.append(
            f"the model's dtype policy differs between workers ({listed}): their variables "
            "and gradients would not match in the all-reduce. Fix: set the same policy on every "
            "worker (keras.config.set_dtype_policy(...) before building the model), e.g. from "
            "the same command-line flag.")
    hosts: dict[str, list[dict[str, Any]]] = {}
    for rank, p in enumerate(peers):
        hosts.setdefault(p["host"], []).append({**p, "rank": rank})
    for host, group in hosts.items():
        errors.extend(_shared_caches(host, [p["rank"] for p in group],
                                     [p.get("caches", {}) for p in group]))
        threads = sum(p["threads"] for p in group)
        cores = group[0]["cores"]
        if threads > cores and any(p["threads"] > 1 for p in group):
            share = max(1, cores // len(group))
            notes.append(
                f"host {host}: {len(group)} worker(s) run {threads} compute threads in all on "
                f"{cores} cores; oversubscribed threads slow every synchronous step. Fix: "
                f"TF_NUM_INTRAOP_THREADS={share} (and TF_NUM_INTEROP_THREADS, OMP_NUM_THREADS) "
                "per worker, as python -m launch.local --threads-per-worker does by default.")
    return errors, notes


def _shared_caches(host: str, ranks: list[int],
                   caches: list[dict[str, list[str]]]) -> list[str]:
    """Errors for `cache(filename)` steps that several workers of one host would write to the
    same files."""
    users: dict[tuple[str, str], list[int]] = {}
    for rank, found in zip(ranks, caches):
        for name, files in found.items():
            for file in dict.fromkeys(files):
                users.setdefault((name, file), []).append(rank)
    return [
        f"{name!r} caches to {file!r} on workers {', '.join(map(str, sharing))} of host "
        f"{host}: they would write the same cache files, and TensorFlow fails all but one at "
        "the first step (\"There appears to be a concurrent caching iterator running - cache "
        "lockfile already exists\"). Fix: a file per worker, e.g. "
        "dataset.cache(f\"{prefix}-w{disttrain.Cluster.from_env().worker_rank}\"), or cache() in "
        "memory."
        for (name, file), sharing in users.items() if len(sharing) > 1]


def _unique(items: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_optimizer(optimizer: Any, errors: list[str]) -> None:
    """Optimizer options whose conditional update Keras cannot run in a replica context
    (a `cond` around a `merge_call`: "merge_call called while defining a new graph")."""
    while optimizer is not None:
        name = type(optimizer).__name__
        steps = getattr(optimizer, "gradient_accumulation_steps", None)
        if steps:
            errors.append(
                f"{name}(gradient_accumulation_steps={steps}): Keras 3 cannot accumulate "
                "gradients under a distribution strategy (it fails at the first step with "
                "\"merge_call called while defining a new graph\"). Fix: leave "
                "gradient_accumulation_steps unset and make the global batch "
                f"{steps}x larger (more workers, or a larger per-worker batch): the same "
                "update, since the gradients of all workers are summed anyway.")
        frequency = getattr(optimizer, "ema_overwrite_frequency", None)
        if getattr(optimizer, "use_ema", False) and frequency:
            errors.append(
                f"{name}(use_ema=True, ema_overwrite_frequency={frequency}): Keras 3 cannot "
                "overwrite the weights with their moving averages every few steps under a "
                "distribution strategy (\"merge_call called while defining a new graph\"). Fix: "
                "ema_overwrite_frequency=None; fit copies the averages into the model when "
                "it ends (optimizer.finalize_variable_values).")
        optimizer = getattr(optimizer, "inner_optimizer", None)


def _check_batch(x: Any, batch_size: Any, replicas: int, errors: list[str],
                 notes: list[str]) -> None:
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        batch, where = pipeline.batch_size(x), "the dataset's batch"
    elif hasattr(x, "shape") or isinstance(x, (list, tuple, dict)):
        batch, where = (batch_size or 32), "batch_size"
    else:
        return
    if batch is None or replicas < 2:
        return
    if batch < replicas:
        errors.append(
            f"the global batch ({where}: {batch}) is smaller than the {replicas} replicas: "
            "some replicas would get no samples. Fix: batch with the GLOBAL batch size, at "
            f"least {replicas} and a multiple of it (per-replica batch x {replicas}).")
    elif batch % replicas:
        low, high = batch // replicas, batch // replicas + 1
        notes.append(
            f"the global batch ({where}: {batch}) is not divisible by the {replicas} replicas: "
            f"replicas get {low} or {high} samples per step, so their gradients carry "
            f"different weight. Fix: use a multiple of {replicas}, e.g. {high * replicas}.")


def _check_steps(x: Any, arguments: Mapping[str, Any], errors: list[str],
                 notes: list[str]) -> None:
    import tensorflow as tf

    steps = arguments.get("steps_per_epoch")
    if steps is None or not isinstance(x, tf.data.Dataset):
        return
    batches = int(x.cardinality())
    if batches < 0:
        return
    epochs = (arguments.get("epochs") or 1) - (arguments.get("initial_epoch") or 0)
    if steps > batches:
        errors.append(
            f"steps_per_epoch={steps} but the input holds {batches} global batches: the first "
            f"epoch would run out of data at step {batches + 1} and training would stop there. "
            f"Fix: steps_per_epoch <= {batches}, or repeat the input (dataset.repeat()).")
    elif steps * epochs > batches:
        last = batches // steps
        notes.append(
            f"steps_per_epoch={steps} for {epochs} epoch(s) needs {steps * epochs} batches but "
            f"the input holds {batches} and Keras does not restart it when steps_per_epoch is "
            f"set: training would stop after epoch {last}. Fix: dataset.repeat(), or "
            f"steps_per_epoch <= {batches // max(epochs, 1)}.")


def _check_sharding(name: str, dataset: Any, workers: int, errors: list[str],
                    notes: list[str]) -> None:
    import tensorflow as tf

    policy = dataset.options().experimental_distribute.auto_shard_policy
    policies = tf.data.experimental.AutoShardPolicy
    if policy not in (policies.AUTO, policies.FILE):
        return
    if not pipeline.reads_files(dataset):
        work = sorted({kind.strip("_").replace("Dataset", "") for kind in
                       (type(node).__name__ for node in pipeline.datasets(dataset))
                       if any(w in kind for w in _PER_ELEMENT_WORK)})
        if policy == policies.AUTO and work:
            notes.append(
                f"{name!r}: TensorFlow cannot shard it by file (no file reader in the pipeline), "
                f"so AUTO falls back to DATA: each of the {workers} workers runs the whole "
                f"pipeline ({', '.join(work)}) on every element and keeps 1/{workers} of them, "
                f"{workers}x the input work. Fix: read files (TFRecordDataset, TextLineDataset) "
                "so each worker reads its own, or shard before the expensive steps "
                "(dataset.shard(num_workers, rank) with AutoShardPolicy.OFF).")
        return
    files = pipeline.file_count(dataset)
    if files is None or files >= workers:
        return
    errors.append(
        f"{name!r} is sharded by file ({policy.name}: it reads files) but has {files} file(s) "
        f"for {workers} workers: TensorFlow would fail at the first step (\"Could not apply "
        f"FILE based sharding\"). Fix: split the data into at least {workers} files (ideally "
        "many more, for even shards), or set AutoShardPolicy.DATA (every worker then reads "
        f"all files and keeps 1/{workers} of the records).")
