"""The one patch of Keras's epoch iterator: a persistent input iterator, and resuming mid-epoch.

Two behaviours share `TFEpochIterator._enumerate_iterator`, so they live in one
wrapper with one order: the epoch's steps come from the persistent iterator when
the fix `persistent_epoch_iterator` is on (else from Keras's), then the batches
a mid-epoch resume asked to skip are drawn from those steps without training on
them. The wrapper is installed once, by `keras_compat.apply()` or by the first
`skip_batches_of_next_epoch()`, whichever comes first.

See `docs/keras_compat.md#persistent_epoch_iterator` and
`docs/keras_compat.md#resuming-inside-an-epoch`.

Example:

```python
from disttrain.keras_compat import epoch_iterator

epoch_iterator.skip_batches_of_next_epoch(120)   # in a callback's on_epoch_begin
```
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings

from disttrain.keras_compat import detection, versions

NAME = "persistent_epoch_iterator"
UPSTREAM = ("measured here (keras 3.15.1): a new distributed iterator twice per epoch and a "
            "has-data all-reduce per step")

_lock = threading.Lock()
_wrapped = False
_persistent = False
_pending_skip = 0
_pending_passes = 0


def is_needed() -> bool:
    """Whether Keras makes a new input iterator per epoch when `steps_per_epoch` is None.

    Raises:
        detection.TargetNotFound: Keras's epoch iterators no longer keep their
            input iterator in `_current_iterator` and their distributed dataset in
            `_distributed_dataset`, where the wrapper reads them.
    """
    from keras.src.trainers.epoch_iterator import EpochIterator

    tf_epoch_iterator = detection.find(detection.tf_trainer(), "TFEpochIterator")
    enumerate_steps = detection.find(EpochIterator, "_enumerate_iterator")
    if not (detection.source_contains(enumerate_steps, "self._current_iterator")
            and detection.source_contains(tf_epoch_iterator, "self._distributed_dataset")):
        raise detection.TargetNotFound(
            "EpochIterator._enumerate_iterator or TFEpochIterator changed: no "
            "_current_iterator or _distributed_dataset")
    return detection.source_contains(enumerate_steps, "self.steps_per_epoch is None",
                                     "self._current_iterator = iter(self._get_iterator())")


def install() -> None:
    """Turns on the persistent iterator for epoch iterators created from now on."""
    global _persistent
    _wrap_once()
    with _lock:
        _persistent = True


def skip_batches_of_next_epoch(batches: int, passes: int = 0) -> None:
    """Asks the next training epoch to pass over its first `batches` batches.

    The batches are drawn from the input without training on them and without
    batch callbacks, so with a deterministic input order the rest of the epoch
    trains on what an uninterrupted run would have. The first epoch enumerated
    after the request consumes it: make it in `on_epoch_begin`.

    With the persistent iterator, an input whose passes differ (a `shuffle`
    that reshuffles each iteration, a random op in a `map`) is instead started
    where an uninterrupted run would be: `passes` whole passes and `batches`
    batches into the repeated dataset (`skip` before distribution, so every
    worker count sees the same global batches). See
    `docs/resume.md#what-the-input-resumes-from`.

    Args:
        batches: how many batches of the epoch were trained before the backup.
        passes: how many whole passes over the input this `fit` made before
            the epoch in an uninterrupted run (its epochs before this one).

    Raises:
        ValueError: `batches` or `passes` is negative.
    """
    global _pending_skip, _pending_passes
    if batches < 0 or passes < 0:
        raise ValueError(f"batches={batches}, passes={passes} must be >= 0. Fix: pass the "
                         "number of batches of the epoch and of epochs already trained.")
    _wrap_once()
    with _lock:
        _pending_skip, _pending_passes = batches, passes


def cancel() -> None:
    """Drops a skip request no epoch has consumed (e.g. `fit` ended first)."""
    global _pending_skip, _pending_passes
    with _lock:
        _pending_skip = _pending_passes = 0


def _take_skip() -> tuple[int, int]:
    global _pending_skip, _pending_passes
    with _lock:
        request = _pending_skip, _pending_passes
        _pending_skip = _pending_passes = 0
    return request


def _wrap_once() -> None:
    global _wrapped
    with _lock:
        if _wrapped:
            return
        import keras

        cls = detection.tf_trainer().TFEpochIterator
        original_init, original_reset = cls.__init__, cls.reset
        original_enumerate = cls._enumerate_iterator
        ranges = versions.step_ranges(keras.__version__)

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self._disttrain_at_pass_start = False
            dataset = _one_pass_dataset(self) if _persistent else None
            self._disttrain_persistent = dataset is not None
            self._disttrain_dataset = dataset
            if dataset is not None:
                self._distributed_dataset = (
                    self._distribute_strategy.experimental_distribute_dataset(dataset.repeat()))
                self.steps_per_epoch, self._num_batches = self._num_batches, None

        @functools.wraps(original_reset)
        def reset(self):
            if not getattr(self, "_disttrain_persistent", False):
                return original_reset(self)
            kept = self._current_iterator if self._disttrain_at_pass_start else None
            original_reset(self)
            self._current_iterator, self._num_batches = kept, None

        @functools.wraps(original_enumerate)
        def _enumerate_iterator(self):
            skip, passes = _take_skip()
            replayed = _start_at(self, passes, skip) if skip or passes else False
            steps = original_enumerate(self)
            if not ranges:
                steps = ((step, step + self.steps_per_execution - 1, iterator)
                         for step, iterator in steps)
            if getattr(self, "_disttrain_persistent", False):
                steps = _one_pass(self, steps)
            if skip:
                steps = _skip(steps, skip, draw=not replayed)
            # Keras's own shape: `(begin, end, iterator)` from 3.11, `(step, iterator)` before.
            yield from steps if ranges else ((begin, it) for begin, _, it in steps)

        cls.__init__, cls.reset, cls._enumerate_iterator = __init__, reset, _enumerate_iterator
        _wrapped = True


def _one_pass(epoch_iterator, steps):
    """`steps`, Keras's `(begin, end, iterator)` over the repeated dataset, limited
    to one pass."""
    epoch_iterator._disttrain_at_pass_start = False
    batches = epoch_iterator.steps_per_epoch
    for begin, end, iterator in steps:
        if begin + epoch_iterator.steps_per_execution > batches:
            # The epoch's last call runs only the batches left in this pass.
            iterator = itertools.islice(iterator, batches - begin)
        yield begin, end, iterator
    epoch_iterator._disttrain_at_pass_start = True


def _skip(steps, skip: int, draw: bool = True):
    """`steps` without the steps that end before batch `skip`, their batches drawn unused
    (unless `draw` is False: the iterator already starts after them)."""
    import tensorflow as tf

    for begin, end, iterator in steps:
        if end < skip:
            try:
                for _ in range(end - begin + 1 if draw else 0):
                    next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                return
            continue
        yield begin, end, iterator


def _start_at(epoch_iterator, passes: int, batches: int) -> bool:
    """Makes a persistent iterator whose passes differ start `passes` passes and
    `batches` batches into its repeated dataset; True when it did. Otherwise
    (passes all alike, or no persistent iterator) the caller draws `batches`."""
    dataset = getattr(epoch_iterator, "_disttrain_dataset", None)
    if dataset is None:
        if passes and _tf_dataset_passes_differ(epoch_iterator):
            warnings.warn(
                f"disttrain: resuming after {passes} whole passes over an input whose passes "
                "differ (a shuffle that reshuffles each iteration, or a random op), not read "
                "through disttrain's persistent iterator (one worker, steps_per_epoch, an "
                "input of unknown length, FILE sharding or a pipeline that reads variables): "
                "the resumed epochs see another order than an uninterrupted run would. See "
                "docs/resume.md#what-the-input-resumes-from.", stacklevel=2)
        return False
    if epoch_iterator._current_iterator is not None or not _passes_differ(dataset):
        return False
    start = passes * epoch_iterator.steps_per_epoch + batches
    epoch_iterator._distributed_dataset = (
        epoch_iterator._distribute_strategy.experimental_distribute_dataset(
            dataset.repeat().skip(start)))
    return True


def _tf_dataset_passes_differ(epoch_iterator) -> bool:
    """`_passes_differ` of the `tf.data.Dataset` a Keras epoch iterator reads, False for
    other inputs (generators, PyDatasets)."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

    if not isinstance(epoch_iterator.data_adapter, TFDatasetAdapter):
        return False
    dataset = epoch_iterator.data_adapter.get_tf_dataset()
    return isinstance(dataset, tf.data.Dataset) and _passes_differ(dataset)


def _one_pass_dataset(epoch_iterator):
    """The tf.data dataset behind `epoch_iterator` when it can be repeated without
    changing what an epoch trains on, else None: a multi-worker strategy, no
    `steps_per_epoch` from the user, an input whose number of batches N is exact
    (a `tf.data.Dataset` of known cardinality, or NumPy arrays and tensors, which
    Keras slices itself; not a PyDataset or generator), and no FILE sharding (its
    workers may hold different numbers of batches; with DATA sharding every
    worker holds its part of every batch)."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

    adapter = epoch_iterator.data_adapter
    batches = epoch_iterator._num_batches
    if (epoch_iterator.steps_per_epoch is not None or not batches
            or type(adapter) not in (TFDatasetAdapter, ArrayDataAdapter)
            or not detection.is_multi_worker(epoch_iterator._distribute_strategy)):
        return None
    dataset = adapter.get_tf_dataset()
    if (not isinstance(dataset, tf.data.Dataset)
            or (isinstance(adapter, TFDatasetAdapter) and int(dataset.cardinality()) != batches)
            or dataset.options().experimental_distribute.auto_shard_policy
            == tf.data.experimental.AutoShardPolicy.FILE
            or _captures_state(dataset)):
        return None
    return dataset


def _captures_state(dataset) -> bool:
    """Whether a function of the pipeline (a `map`, `filter`, `interleave`...)
    captures a resource: a variable or lookup table a callback may change between
    epochs, which an iterator prefetching across the epoch boundary would read
    too early. True when the pipeline cannot be inspected (a TensorFlow change)."""
    import tensorflow as tf

    try:
        return any(t.dtype == tf.resource for node in _pipeline(dataset)
                   for function in _functions(node) for t in function.captured_inputs)
    except (AttributeError, TypeError, NotImplementedError):
        return True


def _passes_differ(dataset) -> bool:
    """Whether two passes over `dataset` may yield different batches: a `shuffle`
    that reshuffles each iteration, a `Dataset.random` that re-randomizes, or a
    stateful op (e.g. `tf.random.uniform`) in one of its functions. True when the
    pipeline cannot be inspected (a TensorFlow change)."""
    try:
        return any(getattr(node, "_reshuffle_each_iteration", False)
                   or getattr(node, "_rerandomize_each_iteration", False)
                   or any(op.op_def.is_stateful for function in _functions(node)
                          for op in function.graph.get_operations())
                   for node in _pipeline(dataset))
    except (AttributeError, TypeError, NotImplementedError):
        return True


def _pipeline(dataset):
    """Every dataset of the pipeline that ends in `dataset`, once each."""
    pending, seen = [dataset], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        pending.extend(node._inputs())


def _functions(node):
    """The traced functions of one pipeline dataset (its `map`, `filter`... function)."""
    from tensorflow.python.data.ops.structured_function import StructuredFunctionWrapper

    return [value.function for value in vars(node).values()
            if isinstance(value, StructuredFunctionWrapper)]
