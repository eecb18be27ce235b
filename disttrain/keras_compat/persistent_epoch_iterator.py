"""The one patch of Keras's epoch iterator: a persistent input iterator, and resuming mid-epoch.

Two behaviours share `TFEpochIterator._enumerate_iterator`, so they live in one
wrapper with one order: the epoch's steps come from the persistent iterator when
the fix `persistent_epoch_iterator` is on (else from Keras's), then the batches
a mid-epoch resume asked to skip are drawn from those steps without training on
them. The wrapper is installed once, by `keras_compat.apply()` or by the first
`skip_batches_of_next_epoch()`, whichever comes first; the patch register lists
it under this fix's name either way.

See `docs/keras_compat.md#persistent_epoch_iterator` and
`docs/keras_compat.md#resuming-inside-an-epoch`.

Example:

```python
from disttrain.keras_compat import persistent_epoch_iterator

persistent_epoch_iterator.skip_batches_of_next_epoch(120)   # in a callback's on_epoch_begin
```
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings

from disttrain import resume
from disttrain.keras_compat import _patch, detection, pipeline, versions

NAME = "persistent_epoch_iterator"
UPSTREAM = ("measured here (keras 3.15.1): a new distributed iterator twice per epoch and a "
            "has-data all-reduce per step")

_lock = threading.Lock()
_persistent = False


def is_needed() -> bool:
    """Whether Keras makes a new input iterator per epoch when `steps_per_epoch` is None.

    Raises:
        detection.TargetNotFound: Keras's epoch iterators no longer keep their
            input iterator in `_current_iterator` and their distributed dataset in
            `_distributed_dataset`, where the wrapper reads them.
    """
    from keras.src.trainers.epoch_iterator import EpochIterator  # private: keras.src

    tf_epoch_iterator = detection.find(detection.tf_trainer(), "TFEpochIterator")
    enumerate_steps = detection.find(EpochIterator, "_enumerate_iterator")  # private: keras
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
    _wrap()
    with _lock:
        _persistent = True


def skip_batches_of_next_epoch(batches: int, passes: int = 0) -> None:
    """Asks the next training epoch to pass over its first `batches` batches.

    The batches are drawn from the input without training on them and without
    batch callbacks, so with a deterministic input order the rest of the epoch
    trains on what an uninterrupted run would have. The first epoch enumerated
    after the request consumes it: make it in `on_epoch_begin`. The request is
    kept in `disttrain.resume.current().skip` (cancel it there).

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
    resume.current().skip.ask(batches, passes)
    _wrap()


def _wrap() -> None:
    """Wraps `TFEpochIterator.__init__`, `reset` and `_enumerate_iterator` (the register
    refuses a second wrap)."""
    cls = detection.tf_trainer().TFEpochIterator  # private: keras TFEpochIterator
    _patch.wrap(cls, "__init__", _init_with_persistent_stream, by=NAME)
    _patch.wrap(cls, "reset", _reset_keeping_the_iterator, by=NAME)
    _patch.wrap(cls, "_enumerate_iterator", _enumerating_persistent_steps,  # private: keras
                by=NAME)


def _init_with_persistent_stream(original_init):
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._disttrain_at_pass_start = False
        dataset = _one_pass_dataset(self) if _persistent else None
        seeds = _SeedGenerators.of(dataset) if dataset is not None else None
        if seeds is _NOT_DETACHABLE:
            dataset = seeds = None
        self._disttrain_persistent = dataset is not None
        self._disttrain_dataset, self._disttrain_seeds = dataset, seeds
        self._disttrain_stream = None
        if dataset is not None:
            # private: keras EpochIterator._num_batches
            self.steps_per_epoch, self._num_batches = self._num_batches, None

    return __init__


def _reset_keeping_the_iterator(original_reset):
    @functools.wraps(original_reset)
    def reset(self):
        if not getattr(self, "_disttrain_persistent", False):
            return original_reset(self)
        # private: keras EpochIterator._current_iterator
        kept = self._current_iterator if self._disttrain_at_pass_start else None
        original_reset(self)
        self._current_iterator, self._num_batches = kept, None

    return reset


def _enumerating_persistent_steps(original_enumerate):
    import keras

    ranges = versions.step_ranges(keras.__version__)

    @functools.wraps(original_enumerate)
    def _enumerate_iterator(self):
        skip, passes = resume.current().skip.take()
        if getattr(self, "_disttrain_persistent", False):
            _epoch_starts(self)
        replayed = _start_at(self, passes, skip) if skip or passes else False
        _before_new_iterator(self)
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

    return _enumerate_iterator


def _before_new_iterator(epoch_iterator) -> None:
    """Lets the process's `disttrain.resume` input stream record (or, resuming, restore)
    the random state the input stream starts from, when this epoch makes a new input
    iterator (Keras's condition), before any element is drawn."""
    # private: keras EpochIterator
    if epoch_iterator._current_iterator is None or epoch_iterator.steps_per_epoch is None:
        resume.current().stream.stream_starts(epoch_iterator)


def _epoch_starts(epoch_iterator) -> None:
    """The draw Keras's new iterator at an epoch's start makes from the user's seed
    generators; the first epoch also builds the persistent stream, detached from them
    and seeded by that draw."""
    seeds = epoch_iterator._disttrain_seeds
    values = seeds.draw() if seeds is not None else None
    if epoch_iterator._disttrain_stream is None:
        stream = (seeds.detached(values) if seeds is not None
                  else epoch_iterator._disttrain_dataset)
        epoch_iterator._disttrain_stream = stream
        epoch_iterator._distributed_dataset = (  # private: keras EpochIterator
            epoch_iterator._distribute_strategy.experimental_distribute_dataset(stream.repeat()))


# The tf.data ops whose passes draw from a seed generator the dataset owns: the name
# of the attribute that makes each pass draw anew, and the index of the `seed` input
# (`seed2` and `seed_generator` follow it).
_SEEDED_OPS = {"ShuffleDatasetV3": ("reshuffle_each_iteration", 2),
               "RandomDatasetV2": ("rerandomize_each_iteration", 0)}
_NOT_DETACHABLE = object()


class _SeedGenerators:
    """The seed generators of a user's `tf.data.Dataset` that make its passes differ
    (a `shuffle` that reshuffles each iteration, a `Dataset.random` that re-randomizes).

    Each new iterator over the dataset (each pass of a `repeat()` of it, or of
    anything built on it) advances them once, and they belong to the user's dataset
    object. A persistent iterator over them would advance them as often as its
    prefetching runs ahead, a timing-dependent number of times; so the persistent
    stream reads a copy of the pipeline with generators of its own (`detached`),
    and the user's generators advance only where Keras's iterators would advance
    them (`draw`), leaving the user's object where Keras would leave it.
    """

    def __init__(self, graph, nodes: list, element_spec) -> None:
        self._graph, self._nodes, self._element_spec = graph, nodes, element_spec
        self._probe = None

    @classmethod
    def of(cls, dataset):
        """A `_SeedGenerators` of `dataset`, None when it has none, or
        `_NOT_DETACHABLE` when its pipeline cannot be copied (a TensorFlow change,
        or a graph TensorFlow cannot serialize)."""
        import tensorflow as tf

        try:
            if not pipeline.reshuffles(dataset):
                return None
            # private: tensorflow
            graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph(
                external_state_policy=tf.data.experimental.ExternalStatePolicy.IGNORE).numpy())
        except (AttributeError, TypeError, ValueError, tf.errors.OpError):
            return _NOT_DETACHABLE
        nodes = [node for node in graph.node if node.op in _SEEDED_OPS
                 and node.attr[_SEEDED_OPS[node.op][0]].b]
        return cls(graph, nodes, dataset.element_spec) if nodes else _NOT_DETACHABLE

    def draw(self) -> list:
        """Advances each generator once, as a new iterator over the user's dataset
        would, and returns two random int64 drawn from each one's new seeds."""
        import tensorflow as tf

        if self._probe is None:
            self._probe = tf.data.Dataset.zip(tuple(
                self._probe_of(node).take(2).batch(2) for node in self._nodes))
        return [[int(v) for v in values.numpy()] for values in next(iter(self._probe))]

    def detached(self, values: list):
        """The user's pipeline with generators of its own, seeded by `values` (one
        `draw()`): the same draw gives the same stream in every process."""
        import uuid

        import tensorflow as tf

        graph = tf.compat.v1.GraphDef()
        graph.CopyFrom(self._graph)
        by_name = {node.name: node for node in graph.node}
        for node, (seed, seed2) in zip(self._nodes, values):
            first = _SEEDED_OPS[node.op][1]
            copy = by_name[node.name]
            seed2 = seed2 if seed or seed2 else 1  # (0, 0) asks TensorFlow for random seeds
            for offset, value in enumerate((seed, seed2)):
                const = _add_const(graph, f"{node.name}/disttrain_seed{offset}",
                                   tf.constant(value, tf.int64))
                copy.input[first + offset] = const.name
            handle = graph.node.add()
            handle.CopyFrom(by_name[node.input[first + 2]])
            handle.name = f"{node.name}/disttrain_seed_generator"
            # A name no resource has: the op creates, and owns, a new generator.
            handle.attr["value"].tensor.resource_handle_val[0].name += f"/{uuid.uuid4().hex}"
            copy.input[first + 2] = handle.name
        return _from_graph(graph, self._element_spec)

    def _probe_of(self, node):
        """A `Dataset.random` that draws from `node`'s generator (shared by handle)."""
        import tensorflow as tf

        first = _SEEDED_OPS[node.op][1]
        by_name = {n.name: n for n in self._graph.node}
        graph = tf.compat.v1.GraphDef()
        inputs = []
        for name in node.input[first:first + 3]:
            copy = graph.node.add()
            copy.CopyFrom(by_name[name])
            inputs.append(copy.name)
        random = graph.node.add()
        random.name, random.op = "disttrain_probe", "RandomDatasetV2"
        random.input.extend(inputs)
        random.attr["rerandomize_each_iteration"].b = True
        random.attr["output_types"].list.type.append(tf.int64.as_datatype_enum)
        random.attr["output_shapes"].list.shape.add()
        _add_retval(graph, random.name)
        return _from_graph(graph, tf.TensorSpec([], tf.int64))


def _add_const(graph, name: str, value):
    import tensorflow as tf

    node = graph.node.add()
    node.name, node.op = name, "Const"
    node.attr["dtype"].type = value.dtype.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value.numpy()))
    return node


def _add_retval(graph, name: str) -> None:
    import tensorflow as tf

    node = graph.node.add()
    node.name, node.op = "dataset", "_Retval"
    node.input.append(name)
    node.attr["T"].type = tf.variant.as_datatype_enum
    node.attr["index"].i = 0


def _from_graph(graph, element_spec):
    """The `tf.data.Dataset` of a serialized dataset graph."""
    import tensorflow as tf
    from tensorflow.python.data.ops.dataset_ops import _VariantDataset  # private: tensorflow.python

    variant = tf.raw_ops.DatasetFromGraph(graph_def=graph.SerializeToString())
    return _VariantDataset(variant, element_spec)


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
    if epoch_iterator._disttrain_seeds is not None:
        # Keras makes a new iterator here (dropped unused): one more draw.
        epoch_iterator._disttrain_seeds.draw()


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
    # private: keras EpochIterator
    if epoch_iterator._current_iterator is not None or not pipeline.passes_differ(dataset):
        return False
    start = passes * epoch_iterator.steps_per_epoch + batches
    epoch_iterator._distributed_dataset = (  # private: keras EpochIterator
        epoch_iterator._distribute_strategy.experimental_distribute_dataset(
            epoch_iterator._disttrain_stream.repeat().skip(start)))
    return True


def _tf_dataset_passes_differ(epoch_iterator) -> bool:
    """`pipeline.passes_differ` of the `tf.data.Dataset` a Keras epoch iterator reads, False for
    other inputs (generators, PyDatasets)."""
    import tensorflow as tf
    # private: keras.src
    from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

    if not isinstance(epoch_iterator.data_adapter, TFDatasetAdapter):
        return False
    dataset = epoch_iterator.data_adapter.get_tf_dataset()
    return isinstance(dataset, tf.data.Dataset) and pipeline.passes_differ(dataset)


def _one_pass_dataset(epoch_iterator):
    """The tf.data dataset behind `epoch_iterator` when it can be repeated without
    changing what an epoch trains on, else None: a multi-worker strategy, no
    `steps_per_epoch` from the user, an input whose number of batches N is exact
    (a `tf.data.Dataset` of known cardinality, or NumPy arrays and tensors, which
    Keras slices itself; not a PyDataset or generator), and no FILE sharding (its
    workers may hold different numbers of batches; with DATA sharding every
    worker holds its part of every batch)."""
    import tensorflow as tf
    # private: keras.src
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    # private: keras.src
    from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

    adapter = epoch_iterator.data_adapter
    batches = epoch_iterator._num_batches  # private: keras EpochIterator
    if (epoch_iterator.steps_per_epoch is not None or not batches
            or type(adapter) not in (TFDatasetAdapter, ArrayDataAdapter)
            # private: keras EpochIterator
            or not detection.is_multi_worker(epoch_iterator._distribute_strategy)):
        return None
    dataset = adapter.get_tf_dataset()
    if (not isinstance(dataset, tf.data.Dataset)
            or (isinstance(adapter, TFDatasetAdapter) and int(dataset.cardinality()) != batches)
            or dataset.options().experimental_distribute.auto_shard_policy
            == tf.data.experimental.AutoShardPolicy.FILE
            or pipeline.captures_state(dataset)):
        return None
    return dataset
