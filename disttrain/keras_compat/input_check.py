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

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import random
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from disttrain.errors import InputMismatchError
from disttrain.keras_compat import _patch, detection, input_order, later_batches, pipeline
from disttrain.keras_compat.digest import array_fingerprint, batch_digest

NAME = "input_check"
ENV_DISABLE = "DISTTRAIN_INPUT_CHECK"
"""Set to `0` to skip the check (it must then be `0` on every worker)."""

# Bytes of an array hashed at a time (a view of the array, not a copy).

_log = logging.getLogger(__name__)
_passed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_END = object()
_ORDER = "shuffle order"
_call = threading.local()


@dataclasses.dataclass
class Checked:
    """What `check_inputs` found: the inputs to go on with, and the agreed shuffle seed.

    Attributes:
        inputs: argument name → value for the arguments that must be passed on
            instead of the caller's (a generator whose first batch was drawn for
            the check, put back in front of the rest).
        seed: the seed every worker agreed for Keras's shuffle (the chief's draw),
            when `shuffle` was asked and no global seed is set; else None.
    """

    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None


def check_inputs(strategy: Any, inputs: Mapping[str, Any], call: str,
                 shuffle: bool = False, validation_split: float = 0.0) -> Checked:
    """Raises on every worker when their unsharded inputs differ.

    Checked: `tf.data.Dataset`s that TensorFlow will shard by element (auto-shard
    policy `DATA`, or `AUTO` on a pipeline without a file reader: the first batch
    and the cardinality), NumPy arrays and tensors (all their contents, hashed in
    place), `PyDataset`s (length, first and last batch) and generators (the first
    batch, drawn and put back). FILE- or OFF-sharded and already distributed
    datasets are left alone, and so is a dataset object that passed before. With
    `shuffle`, the workers' global seeds must agree too, and without one they agree
    a seed for Keras's shuffle. Every worker must call it at the same point with
    the same kinds of inputs; the checked ones cost one exchange in all. A no-op
    outside multi-worker training and when `DISTTRAIN_INPUT_CHECK=0`.

    Args:
        strategy: the model's distribution strategy.
        inputs: argument name → value (e.g. `{"x": x, "y": y, "validation_data": val}`).
        call: what is about to run (`"fit"`, `"evaluate"`, `"predict"`), for the message.
        shuffle: whether Keras will shuffle an array or `PyDataset` `x`
            (`input_order.shuffled`).
        validation_split: fit's `validation_split`, for the message.

    Returns:
        A `Checked`: the inputs to pass on in place of the given ones, and the
        agreed shuffle seed.

    Raises:
        InputMismatchError: an input differs between workers, the global seeds
            differ while Keras shuffles, or a worker could not read its input.

    Example:

    ```python
    input_check.check_inputs(model.distribute_strategy, {"x": x, "y": y}, "fit", shuffle=True)
    ```
    """
    if os.environ.get(ENV_DISABLE, "1") == "0" or not detection.is_multi_worker(strategy):
        return Checked()
    checked = Checked()
    kinds = {name: kind for name, value in inputs.items() if (kind := _kind(value))}
    if not kinds and not shuffle:
        return checked
    from disttrain import coordination

    local, failure = {}, None
    for name, kind in kinds.items():
        try:
            local[name], replacement = _fingerprint_of(kind, inputs[name])
        except Exception as e:  # reported to every worker below, then re-raised here
            failure, replacement = failure or e, None
            local[name] = {"error": f"{type(e).__name__}: {e}"}
        if replacement is not None:
            checked.inputs[name] = replacement
    proposal = random.SystemRandom().randrange(1, 2**31 - 1)
    if shuffle:
        local[_ORDER] = {"global seed": str(input_order.global_seed())}
    coord = coordination.get()
    peers = [json.loads(v) for v in coord.gather(
        f"keras_compat.{NAME}.{call}", json.dumps({"seed": proposal, "inputs": local},
                                                  sort_keys=True))]
    seen_by_name = {name: [peer["inputs"][name] for peer in peers] for name in local}
    for name, seen in seen_by_name.items():
        if all(s == seen[0] for s in seen):
            continue
        if kinds.get(name) == "dataset":
            raise InputMismatchError(_message(call, name, seen)) from failure
        raise InputMismatchError(_mismatch(call, name, kinds.get(name), seen,
                                           validation_split)) from failure
    for name, kind in kinds.items():
        if kind == "dataset":
            _passed[inputs[name]] = True
    if shuffle and input_order.global_seed() is None:
        checked.seed = peers[0]["seed"]
    return checked


def fingerprint(dataset: Any) -> dict[str, Any]:
    """A digest of `dataset`'s first element and its cardinality.

    The first element is drawn from a new iterator, so a training iterator is not
    touched; pipelines with randomness draw once (a seeded reshuffling `shuffle`
    then starts training at its second order, the same on every worker). In a
    process that backs up its input's random state (`disttrain.resume.input_state`),
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

    from disttrain import resume

    with resume.current().stream.kept():
        first = next(iter(dataset.take(1)), None)
    x, y, sample_weight = unpack_x_y_sample_weight(first) if first is not None else (
        None, None, None)
    found = {"batches": int(dataset.cardinality()), "inputs": batch_digest(x),
             "targets": batch_digest((y, sample_weight)) if y is not None else None}
    if pipeline.shards_itself(dataset):
        found["shards itself"] = True
    return found


def checked_call(model: Any, method: Callable, call: inspect.BoundArguments,
                 arguments: tuple[str, ...]) -> Any:
    """Checks the inputs of a `fit`/`evaluate`/`predict` call, then makes it: with the
    checked inputs in place of the given ones (a generator's first batch put back) and,
    when Keras shuffles arrays or a `PyDataset`, in the order every worker agreed
    (`input_order`). Called by the `call_checks` hook.

    Args:
        model: the model whose method is called.
        method: Keras's `fit`, `evaluate` or `predict` (unbound).
        call: the call's bound arguments (`model` first); updated in place.
        arguments: the names of the arguments that may hold inputs.
    """
    bound, name = call.arguments, method.__name__
    strategy = model.distribute_strategy
    shuffle = input_order.shuffled(name, bound)
    checked = check_inputs(strategy, {a: bound.get(a) for a in arguments}, name,
                           shuffle=shuffle,
                           validation_split=bound.get("validation_split") or 0.0)
    bound.update(checked.inputs)
    if not detection.is_multi_worker(strategy):
        return method(*call.args, **call.kwargs)
    with _each_epoch_checked(name), _later_batches_compared(name, bound):
        if not shuffle:
            return method(*call.args, **call.kwargs)
        if checked.seed is None and input_order.global_seed() is None:
            _log.warning("keras_compat: %s is off and no global seed is set, so Keras's "
                         "shuffle of array or PyDataset inputs draws another order on each "
                         "worker. Fix: keras.utils.set_random_seed(S) on every worker, or "
                         "shuffle=False.", NAME)
            return method(*call.args, **call.kwargs)
        with input_order.agreed(checked.seed):
            return method(*call.args, **call.kwargs)


def install() -> None:
    """Checks every `PyDataset` again at the start of each epoch of a checked
    multi-worker call (`check_epoch`); once per process, by the `call_checks` hook."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import (  # private: keras.src
        PyDatasetAdapter,
    )

    _patch.wrap(PyDatasetAdapter, "on_epoch_begin", _checked_each_epoch, by=NAME)


@contextlib.contextmanager
def _each_epoch_checked(call: str) -> Iterator[None]:
    """Inside, each epoch of a `PyDataset` in this thread is checked (`check_epoch`)."""
    previous = getattr(_call, "name", None)
    _call.name = None if os.environ.get(ENV_DISABLE, "1") == "0" else call
    try:
        yield
    finally:
        _call.name = previous


@contextlib.contextmanager
def _later_batches_compared(call: str, bound: dict[str, Any]) -> Iterator[None]:
    """Inside, the batches of a generator or `PyDataset` `x` (and `fit`'s
    `validation_data`) are hashed as they are read and compared between workers at each
    epoch's (validation pass's) end (`later_batches`); `bound`, the call's arguments, gets
    the recording generator and the comparing callback first (also first in a given
    `CallbackList`, taken out again at the end)."""
    import keras

    names = ("x", "validation_data") if call == "fit" else ("x",)
    kinds = {name: kind for name in names
             if (kind := _kind(bound.get(name))) in ("generator", "pydataset")}
    if bound.get("validation_data") is bound.get("x"):  # one input, recorded once
        kinds.pop("validation_data", None)
    if os.environ.get(ENV_DISABLE, "1") == "0" or not kinds:
        yield
        return
    inputs = {name: bound[name] for name in kinds}
    replaced, ledgers = later_batches.record(inputs, kinds)
    bound.update(replaced)
    compare = later_batches.callback(call, ledgers)
    given = bound.get("callbacks")
    if isinstance(given, keras.callbacks.CallbackList):
        given.callbacks.insert(0, compare)
    elif isinstance(given, (list, tuple)):
        bound["callbacks"] = [compare, *given]
    else:
        bound["callbacks"] = [compare] + ([] if given is None else [given])
    try:
        yield
    finally:
        later_batches.stop_recording(inputs)
        if isinstance(given, keras.callbacks.CallbackList):
            given.callbacks.remove(compare)


def _checked_each_epoch(on_epoch_begin: Callable) -> Callable:
    @functools.wraps(on_epoch_begin)
    def wrapper(self):
        on_epoch_begin(self)
        call = getattr(_call, "name", None)
        if call is None:
            return
        self._disttrain_epochs = getattr(self, "_disttrain_epochs", 0) + 1
        try:
            check_epoch(self.py_dataset, call, self._disttrain_epochs)
        except InputMismatchError:
            if self.enqueuer:  # private: keras PyDatasetAdapter; its reader threads
                self.enqueuer.stop()
            raise

    return wrapper


def check_epoch(dataset: Any, call: str, epoch: int) -> None:
    """Raises on every worker when a `PyDataset` differs between workers at an epoch's start.

    A `PyDataset` may reorder itself between epochs (`on_epoch_end` shuffling an
    index list with `np.random.shuffle`, as keras-io's examples do); a draw made
    separately in each process then gives every worker another order from the second
    epoch on, after the check at the call's start passed. Each worker hashes the
    dataset's length, first and last batch (two `__getitem__` calls) and the workers
    exchange that in one gather. Every worker must call it at the same point.

    Args:
        dataset: the `PyDataset`.
        call: the call it feeds (`"fit"`, `"evaluate"`, `"predict"`), for the message.
        epoch: which epoch of that call's input starts (1 for the first).

    Raises:
        InputMismatchError: the workers' batches differ, naming the dataset's class
            and the fix.

    Example:

    ```python
    input_check.check_epoch(train_batches, "fit", epoch=2)   # in on_epoch_begin
    ```
    """
    from disttrain import coordination

    try:
        local = _fingerprint_of("pydataset", dataset)[0]
    except Exception as e:  # reported to every worker below
        local = {"error": f"{type(e).__name__}: {e}"}
    seen = [json.loads(v) for v in coordination.get().gather(
        f"keras_compat.{NAME}.{call}.epoch", json.dumps(local, sort_keys=True))]
    if any(s != seen[0] for s in seen):
        raise InputMismatchError(_reordered(call, type(dataset).__name__, epoch, seen))


def _kind(value: Any) -> str | None:
    """How an input is checked: `"dataset"`, `"arrays"`, `"pydataset"`, `"generator"`,
    or None (not checked)."""
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        can_convert_arrays,
    )
    from keras.utils import PyDataset

    if value is None:
        return None
    if _shards_by_element(value):
        return "dataset"
    if isinstance(value, PyDataset):
        return "pydataset"
    if isinstance(value, types.GeneratorType):
        return "generator"
    if isinstance(value, (list, tuple, dict)) and not value:
        return None
    try:
        return "arrays" if can_convert_arrays((value,)) else None
    except (TypeError, ValueError):
        return None


def _fingerprint_of(kind: str, value: Any) -> tuple[dict[str, Any], Any]:
    """The fingerprint of one input, and what to pass on instead of it (or None)."""
    if kind == "dataset":
        return fingerprint(value), None
    if kind == "arrays":
        return array_fingerprint(value), None
    if kind == "pydataset":
        batches = value.num_batches
        entries = {"batches": str(batches), "batch 0": batch_digest(value[0])}
        if batches:
            entries[f"batch {batches - 1}"] = batch_digest(value[batches - 1])
        return entries, None
    first = next(value, _END)
    return ({"first batch": "none, empty" if first is _END else batch_digest(first)},
            _put_back(first, value))


def _put_back(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """A generator of `first` (unless the input was empty), then the rest."""
    if first is not _END:
        yield first
    yield from rest


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
    sharding = [str(rank) for rank, s in enumerate(seen) if s.get("shards itself")]
    if sharding:
        return (
            f"{call}: {name!r} differs between workers before sharding ({workers}). The "
            f"pipeline calls Dataset.shard itself (on worker(s) {', '.join(sharding)}), and "
            f"TensorFlow shards it again by element (auto_shard_policy DATA, or AUTO with no "
            f"file reader to split by): each of the {len(seen)} workers would keep one "
            f"batch in {len(seen)} of its own shard, so the job would train on 1/"
            f"{len(seen)} of the data. Fix: turn TensorFlow's sharding off for this dataset "
            "(options = tf.data.Options(); options.experimental_distribute.auto_shard_policy = "
            "tf.data.experimental.AutoShardPolicy.OFF; dataset = dataset.with_options(options)), "
            "or drop your .shard(...) and let TensorFlow shard the dataset. To skip this "
            f"check: {ENV_DISABLE}=0 on every worker, or "
            f"disttrain.keras_compat.apply(skip=({NAME!r},)) before disttrain.strategy()."
        )
    return (
        f"{call}: {name!r} differs between workers before sharding ({workers}). TensorFlow "
        f"shards it by element (auto_shard_policy DATA, or AUTO with no file reader to split "
        f"by), so each of the {len(seen)} workers would take one batch in {len(seen)} of "
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


def _mismatch(call: str, name: str, kind: str | None, seen: list[dict[str, str]],
              validation_split: float) -> str:
    """The message for an input other than a `tf.data.Dataset` that differs between workers."""
    skip = (f"To skip this check: {ENV_DISABLE}=0 on every worker, or disttrain.keras_compat."
            f"apply(skip=({NAME!r},)) before disttrain.strategy().")
    errors = [f"worker {rank}: {s['error']}" for rank, s in enumerate(seen) if "error" in s]
    if errors:
        return (f"{call}: the input check could not read {name!r} on every worker "
                f"({'; '.join(errors)}). Fix: make the input readable on every worker. {skip}")
    differing = next(key for key in sorted(set().union(*seen))
                     if any(s.get(key) != seen[0].get(key) for s in seen))
    workers = "; ".join(f"worker {rank}: {s.get(differing)}" for rank, s in enumerate(seen))
    if name == _ORDER:
        return (f"{call}: Keras shuffles the inputs (shuffle=True or \"batch\"), and the workers' global "
                f"seeds differ ({workers}): each worker would draw another order and keep "
                "every N-th batch of it, so some samples would train twice and others never. "
                "Fix: call keras.utils.set_random_seed(S) with the same S on every worker "
                "(or on none: disttrain then agrees a seed), or pass shuffle=False.")
    label = f"{name}{differing}" if kind == "arrays" else f"{name} ({differing})"
    what = {"arrays": "Keras slices arrays and tensors itself on each worker,",
            "pydataset": "Each worker reads the whole PyDataset",
            "generator": "Each worker reads the whole generator"}.get(kind, "Each worker reads it")
    split = (f" With validation_split={validation_split}, each worker's validation set is the "
             "last part of its own arrays, so it is not held out from what the others train on."
             if validation_split and name in ("x", "y", "sample_weight") else "")
    return (
        f"{call}: {label} differs between workers ({workers}). {what} and keeps "
        f"one batch in {len(seen)} of its own copy, so the workers would see different "
        f"samples: some twice and others never.{split} Likely cause: a random draw made "
        "separately in each process before the call (np.random.permutation or shuffle, "
        "a train/test split or generated data without a common seed). Fix: make the same "
        "draw on every worker (keras.utils.set_random_seed(S) at the start of the script, "
        "np.random.default_rng(S), random_state=S), or load the same data everywhere. "
        f"{skip}"
    )


def _reordered(call: str, cls: str, epoch: int, seen: list[dict[str, str]]) -> str:
    """The message for a `PyDataset` that differs between workers at an epoch's start."""
    differing = next((key for key in sorted(set().union(*seen))
                      if any(s.get(key) != seen[0].get(key) for s in seen)), "")
    workers = "; ".join(f"worker {rank}: {s.get(differing)}" for rank, s in enumerate(seen))
    return (
        f"{call}: the PyDataset {cls} differs between workers at the start of epoch {epoch} "
        f"({differing}: {workers}). Each worker reads the whole PyDataset and keeps one "
        f"batch in {len(seen)} of its own copy, so from this epoch some samples would train "
        "twice and others never. Likely cause: its on_epoch_end (or on_epoch_begin) "
        "reorders it with a draw each process makes separately (np.random.shuffle, "
        "random.shuffle, an unseeded np.random.default_rng()). Fix: draw the new order from "
        "a seed every worker shares, e.g. np.random.default_rng(seed + epoch).shuffle("
        "self.indices) with the same seed on every worker, or keras.utils.set_random_seed(S) "
        "at the start of the script; or pass shuffle=True to fit and let Keras reorder the "
        f"batches. To skip this check: {ENV_DISABLE}=0 on every worker."
    )


def _describe(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"failed: {entry['error']}"
    batches = {-1: "infinite", -2: "unknown"}.get(entry["batches"], str(entry["batches"]))
    targets = f", targets {entry['targets']}" if entry["targets"] else ""
    return f"first batch inputs {entry['inputs']}{targets}, {batches} batches"
