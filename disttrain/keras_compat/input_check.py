"""Input check: where TensorFlow shards by element, every worker's input must start identically.

Under multi-worker MWMS, TensorFlow shards a `tf.data.Dataset` by element unless
it reads files it can split (`AutoShardPolicy.AUTO` falls back to `DATA`): each
worker builds the whole dataset and keeps every N-th batch. A random draw made
separately in each process before that point (an unseeded `shuffle`,
`keras.utils.text_dataset_from_directory` without `seed`) gives each worker a
different order, and the workers then count some samples twice and others not at
all, silently. Before `fit`, `evaluate` and `predict` start, every worker hashes
the first batch of its unsharded input (a separate iteration, once per dataset
object) and its cardinality, the workers exchange the fingerprints through
`disttrain.coordination`, and a difference raises `InputMismatchError` on every
worker. Not a fix of Keras code: `disttrain.keras_compat.call_checks` runs it
after the preflight; `apply(skip=("input_check",))` or `DISTTRAIN_INPUT_CHECK=0`
turns it off.
See `docs/keras_compat.md#input-check`.

Example:

```python
train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10_000, seed=42).batch(256)
model.fit(train)      # passes: the seed makes every worker's order the same
```
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Mapping
from typing import Any

from disttrain.errors import InputMismatchError
from disttrain.keras_compat import detection, pipeline

NAME = "input_check"
ENV_DISABLE = "DISTTRAIN_INPUT_CHECK"
"""Set to `0` to skip the check (it must then be `0` on every worker)."""

_passed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_inputs(strategy: Any, inputs: Mapping[str, Any], call: str) -> None:
    """Raises on every worker when their unsharded inputs start differently.

    Only `tf.data.Dataset` inputs that TensorFlow will shard by element are
    checked (auto-shard policy `DATA`, or `AUTO` on a pipeline without a file
    reader); NumPy arrays, generators, `PyDataset`s, FILE- or OFF-sharded and
    already distributed datasets are left alone, and so is a dataset object that
    passed before. Every worker must call it at the same point with the same
    kinds of inputs; the ones checked cost one exchange in all. A no-op outside
    multi-worker training and when `DISTTRAIN_INPUT_CHECK=0`.

    Args:
        strategy: the model's distribution strategy.
        inputs: argument name → value (e.g. `{"x": train_ds, "validation_data": val_ds}`).
        call: what is about to run (`"fit"`, `"evaluate"`, `"predict"`), for the message.

    Raises:
        InputMismatchError: the first batches or the cardinalities differ, or a
            worker could not read its first batch.

    Example:

    ```python
    input_check.check_inputs(model.distribute_strategy, {"x": dataset}, "evaluate")
    ```
    """
    if os.environ.get(ENV_DISABLE, "1") == "0" or not detection.is_multi_worker(strategy):
        return
    datasets = {name: value for name, value in inputs.items()
                if _shards_by_element(value) and value not in _passed}
    if not datasets:
        return
    from disttrain import coordination

    local, failure = {}, None
    for name, dataset in datasets.items():
        try:
            local[name] = fingerprint(dataset)
        except Exception as e:  # reported to every worker below, then re-raised here
            failure = failure or e
            local[name] = {"error": f"{type(e).__name__}: {e}"}
    coord = coordination.get()
    peers = [json.loads(v) for v in coord.gather(f"keras_compat.{NAME}.{call}",
                                                 json.dumps(local, sort_keys=True))]
    for name, dataset in datasets.items():
        seen = [peer[name] for peer in peers]
        if any(s != seen[0] for s in seen):
            raise InputMismatchError(_message(call, name, seen)) from failure
        _passed[dataset] = True


def fingerprint(dataset: Any) -> dict[str, Any]:
    """A digest of `dataset`'s first element and its cardinality.

    The first element is drawn from a new iterator, so a training iterator is not
    touched; pipelines with randomness draw once (a seeded reshuffling `shuffle`
    then starts training at its second order, the same on every worker). In a
    process that backs up its input's random state (`disttrain.input_state`),
    the Python/NumPy/`tf.random` global states are put back after the read.

    Args:
        dataset: a `tf.data.Dataset` of Keras-style elements (`x`, `(x, y)` or
            `(x, y, sample_weight)`).

    Returns:
        `{"batches": cardinality, "inputs": digest of x, "targets": digest of y and
        sample weights, or None}`; cardinality is -1 when infinite, -2 when unknown.

    Example:

    ```python
    fingerprint(tf.data.Dataset.range(8).batch(2))["batches"]   # 4
    ```
    """
    from keras.src.trainers.data_adapters.data_adapter_utils import (  # private: keras.src
        unpack_x_y_sample_weight,
    )

    from disttrain import input_state

    with input_state.kept():
        first = next(iter(dataset.take(1)), None)
    x, y, sample_weight = unpack_x_y_sample_weight(first) if first is not None else (
        None, None, None)
    return {"batches": int(dataset.cardinality()), "inputs": _digest(x),
            "targets": _digest((y, sample_weight)) if y is not None else None}


def _shards_by_element(value: Any) -> bool:
    """Whether TensorFlow will shard `value` by element under multi-worker MWMS."""
    import tensorflow as tf

    if not isinstance(value, tf.data.Dataset):
        return False
    policy = value.options().experimental_distribute.auto_shard_policy
    if policy == tf.data.experimental.AutoShardPolicy.DATA:
        return True
    return (policy == tf.data.experimental.AutoShardPolicy.AUTO
            and not pipeline.reads_files(value))


def _digest(structure: Any) -> str | None:
    """A short hash of every tensor in `structure` (dtype, shape and values)."""
    import numpy as np
    import tensorflow as tf

    if structure is None:
        return None
    digest = hashlib.blake2b(digest_size=12)
    for tensor in tf.nest.flatten(structure, expand_composites=True):
        if tensor is None:
            digest.update(b"none")
            continue
        array = np.asarray(tensor)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        if array.dtype == object:  # strings
            for item in array.ravel():
                digest.update(len(item).to_bytes(8, "little") + item)
        else:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _message(call: str, name: str, seen: list[dict[str, Any]]) -> str:
    workers = "; ".join(f"worker {rank}: {_describe(s)}" for rank, s in enumerate(seen))
    errors = [s["error"] for s in seen if "error" in s]
    if errors:
        return (f"{call}: the input check could not read the first batch of {name!r} on every "
                f"worker ({workers}). Fix: make the input readable on every worker, or set "
                f"{ENV_DISABLE}=0 on every worker to skip the check.")
    only_inputs = all(s["targets"] == seen[0]["targets"] and s["batches"] == seen[0]["batches"]
                      for s in seen)
    hint = (" The targets agree and only the inputs differ: if that is random augmentation "
            "made per worker after a fixed order (harmless), seed it or skip the check."
            if only_inputs and seen[0]["targets"] is not None else "")
    return (
        f"{call}: {name!r} differs between workers before sharding ({workers}). TensorFlow "
        f"shards it by element (auto_shard_policy DATA, or AUTO with no file reader to split "
        f"by), so each of the {len(seen)} workers would take every {len(seen)}-th batch of "
        "its own order: some samples would count twice and others not at all. Likely "
        "cause: a random draw made separately in each process before sharding, such as an "
        "unseeded Dataset.shuffle, Dataset.list_files or sample_from_datasets, or "
        "keras.utils.text_dataset_from_directory / image_dataset_from_directory without "
        "seed. Fix: pass the same seed on every worker (e.g. shuffle(buffer, seed=42), "
        "text_dataset_from_directory(..., seed=1337)); or shard the input yourself "
        "(dataset.shard(num_workers, rank) with options.experimental_distribute."
        "auto_shard_policy = AutoShardPolicy.OFF, or files split with AutoShardPolicy.FILE)."
        f"{hint} To skip this check: {ENV_DISABLE}=0 on every worker, or "
        f"disttrain.keras_compat.apply(skip=({NAME!r},)) before disttrain.strategy()."
    )


def _describe(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"failed: {entry['error']}"
    batches = {-1: "infinite", -2: "unknown"}.get(entry["batches"], str(entry["batches"]))
    targets = f", targets {entry['targets']}" if entry["targets"] else ""
    return f"first batch inputs {entry['inputs']}{targets}, {batches} batches"
