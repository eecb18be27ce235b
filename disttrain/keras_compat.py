"""Narrow fixes that make Keras 3 `fit`/`evaluate`/`predict` work under multi-worker MWMS.

Stock Keras 3 (measured on 3.15.1 with TensorFlow 2.21) cannot train under a
multi-process `tf.distribute.MultiWorkerMirroredStrategy`, and when made to
run, lets BatchNormalization statistics drift apart per worker. Each fix below
targets one defect, says where it is reported upstream, and is applied only
when the defective code is actually present in the installed Keras (detected
from its source), so an upstream fix switches ours off by itself.

Fixes:
- `symbolic_build_local_batch`: `TensorFlowTrainer._maybe_symbolic_build`
  calls `strategy.reduce("MEAN", <PerReplica batch>)` to get a sample batch
  for building the model; under MWMS that raises "Attempt to convert a value
  (PerReplica...)". We build from this worker's local batch instead (the
  batch only provides shapes and dtypes), and only when something is left to
  build, so a built model's `evaluate` and `predict` leave the epoch's iterator
  untouched. Upstream: keras-team/keras#20585, #20329,
  tensorflow/tensorflow#72388.
- `scalar_metric_reduction`: `reduce_per_replica` reduces each step's scalar
  metrics with `strategy.reduce("MEAN", v, axis=0)` on multi-worker, which
  raises "Invalid reduction dimension 0 for input with 0 dimensions". We
  reduce rank-0 values with `axis=None` (mean over replicas), so every worker
  logs the same value. All scalars of a step of one dtype travel in one
  all-reduce (stacked into a vector; the mean is taken element-wise, so each
  value is the same as reduced alone): one collective per step instead of one
  per metric, each costing about 1.5 ms on loopback gRPC (`python -m
  benchmarks`). Between steps Keras reads the epoch's metric results and resets
  the metric variables eagerly, one eager collective per variable (about 7 ms
  each here); under multi-worker both run as compiled functions instead (the
  same collectives, graph mode: about 5 ms for all, instead of about 28 ms
  each). Upstream: keras-team/keras#20585, ray-project/ray#47464.
  Epoch-level logs are read by Keras from the metric variables, which are
  summed across all workers, so they are exact global values.
- `multi_worker_steps_per_execution`: with `compile(steps_per_execution=k)`,
  k > 1, Keras runs k steps per call in a `tf.while_loop` that calls the step
  as a nested `tf.function` inside a `tf.cond`. Under multi-worker MWMS every
  collective's instance key is a call-time capture, which does not reach a
  nested function called inside control flow: the first call fails with "You
  must feed a value for placeholder tensor". Our loop traces the step inline
  (no nested function) and reduces the step outputs (the logs) once per call
  instead of once per step: k steps, one metric all-reduce. Each step still
  fetches its batch with `get_next_as_optional`, so workers agree when the data
  ends, and a call ends early at the end of the data, as Keras's does. With
  `jit_compile=True` it is a clear error before the first step. Measured here
  (keras 3.15.1, TF 2.21), not reported upstream that we found.
- `persistent_epoch_iterator`: with no `steps_per_epoch`, Keras creates a new
  iterator over the input at the start of every epoch and another at its end
  (dropped unused), and runs fit's validation with a new one each time. Under
  multi-worker each creation and deletion of a distributed iterator costs tens
  to hundreds of milliseconds (measured 40 ms to create, 0 to 1,000 ms to
  delete), and for a finite dataset every step adds an all-reduce on whether
  each worker still has data. When the input has a known number of batches N (a
  `tf.data.Dataset` of known cardinality, NumPy arrays or tensors) and is not
  FILE-sharded, we iterate `dataset.repeat()` once per `fit`/`evaluate`/
  `predict` call and take N steps per epoch (with `steps_per_execution=k`, an
  epoch's last call runs only the N mod k batches left): each epoch is one full
  pass, and TensorFlow skips the has-data all-reduce for an infinite dataset. An
  input without randomness trains exactly as with Keras's iterators. A
  `shuffle()` reshuffles every pass, in other orders than Keras's (whose
  discarded iterators also draw from the shuffle's seed); random ops inside the
  pipeline (Keras's own shuffle of NumPy inputs, random augmentation) draw new
  values each epoch, where under a global seed Keras's new iterator per epoch
  replays the first epoch's values (`apply(skip=("persistent_epoch_iterator",))`
  keeps Keras's iterators). A pipeline whose functions capture a variable or
  lookup table keeps Keras's iterators too: a callback may change that state
  between epochs, and an iterator prefetching across the epoch boundary would
  read it early (measured: 7 of 8 batches of the next epoch). The iterator is
  kept across epochs and validations only when the previous epoch ended exactly
  at a pass boundary; an epoch stopped early is followed by a fresh iterator.
  The cost is one more distribution of the dataset per call (about 13 ms here).
  A 2-worker MLP step went from 40.6 to 27.6 ms (`python -m benchmarks`). Inputs
  with per-epoch hooks (a PyDataset, a generator), an unknown cardinality, a
  user's `steps_per_epoch` and FILE sharding (workers may hold different numbers
  of batches) keep Keras's behaviour. Not reported upstream that we found.
- `synced_batchnorm_statistics`: BatchNormalization creates its moving
  statistics with `aggregation="none"`, so each worker keeps statistics of its
  own shard and checkpoints hold one shard's statistics. We average them across
  workers with one batched all-reduce wherever they can be observed: at the
  start of `evaluate` and `predict` (so also before fit's validation), before
  the callbacks' `on_epoch_end` and `on_train_end`, and before a mid-epoch
  checkpoint. The statistics are exponential moving averages, linear in the
  batch moments, so averaging once per epoch gives the same values as
  averaging every update (up to float rounding), at the cost of one
  collective per epoch instead of one per statistic per step. Between those
  points, mid-epoch, each worker holds its own running values; training steps
  do not read them.

Example:

>>> import disttrain.keras_compat as kc
>>> kc.apply()          # idempotent; disttrain.strategy() calls it for you
>>> sorted(kc.applied())  # doctest: +SKIP
['multi_worker_steps_per_execution', 'persistent_epoch_iterator', 'scalar_metric_reduction',
 'symbolic_build_local_batch', 'synced_batchnorm_statistics']

Set `DISTTRAIN_KERAS_COMPAT=0` to leave Keras untouched (for comparisons).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable

from disttrain.errors import KerasCompatError

ENV_DISABLE = "DISTTRAIN_KERAS_COMPAT"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_applied: dict[str, str] = {}
_checked = False


@dataclasses.dataclass(frozen=True)
class _Fix:
    name: str
    upstream: str
    is_needed: Callable[[], bool]
    install: Callable[[], None]


def _source_contains(obj: object, *fragments: str) -> bool:
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return all(f in source for f in fragments)


def _tf_trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _symbolic_build_needed() -> bool:
    trainer = _tf_trainer_module()
    method = getattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", None)
    return method is not None and _source_contains(method, "distribute_strategy.reduce(")


def _install_symbolic_build() -> None:
    import tensorflow as tf
    from keras.src import tree

    trainer = _tf_trainer_module()

    def local_batches(epoch_iterator, strategy):
        for begin, end, it in epoch_iterator:
            batch = tree.map_structure(
                lambda x: strategy.experimental_local_results(x)[0]
                if isinstance(x, tf.distribute.DistributedValues) else x,
                next(it))
            yield begin, end, [batch]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        # Keras's `_symbolic_build` draws from `iterator` only when something is
        # left to build: a built model leaves the epoch's iterator untouched.
        if iterator is not None:
            iterator = local_batches(iterator, self.distribute_strategy)
        with self.distribute_strategy.scope():
            self._symbolic_build(iterator=iterator, data_batch=data_batch)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def _scalar_reduction_needed() -> bool:
    trainer = _tf_trainer_module()
    return _source_contains(trainer.reduce_per_replica, 'strategy.reduce("MEAN", v, axis=0)')


def _install_scalar_reduction() -> None:
    import tensorflow as tf
    from keras.src import tree

    trainer = _tf_trainer_module()
    original = trainer.reduce_per_replica

    def _local(v):
        return v.values[0] if trainer._is_per_replica_instance(v) else v

    def _mean_of_scalars(strategy, scalars: list) -> list:
        stacked = strategy.run(lambda *xs: tf.stack(xs), args=tuple(scalars))
        return tf.unstack(strategy.reduce("MEAN", stacked, axis=None), num=len(scalars))

    def reduce_per_replica(values, strategy, reduction):
        multi_worker = trainer._collective_all_reduce_multi_worker(strategy)
        if not multi_worker or reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)
        flat = tree.flatten(values)
        reduced = list(flat)
        scalars_by_dtype: dict = {}
        for i, v in enumerate(flat):
            if v is None:
                continue
            if _local(v).shape.rank == 0:
                scalars_by_dtype.setdefault(_local(v).dtype, []).append(i)
            else:
                reduced[i] = original(v, strategy, reduction)
        for indices in scalars_by_dtype.values():
            means = _mean_of_scalars(strategy, [flat[i] for i in indices])
            for i, mean in zip(indices, means):
                reduced[i] = mean
        return tree.pack_sequence_as(values, reduced)

    reduce_per_replica.__wrapped__ = original
    trainer.reduce_per_replica = reduce_per_replica
    for name in ("get_metrics_result", "reset_metrics"):
        setattr(trainer.TensorFlowTrainer, name,
                _compiled_when_multi_worker(getattr(trainer.TensorFlowTrainer, name)))


_compiled_metric_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_when_multi_worker(method: Callable) -> Callable:
    """`method(model)` run as a `tf.function` when called eagerly under multi-worker MWMS.

    One function per model and set of metric variables (a metric built later, or a
    recompile, gets a new one); inside a traced step the method runs as is.
    """
    import tensorflow as tf

    trainer = _tf_trainer_module()

    @functools.wraps(method)
    def wrapper(self):
        if not (tf.executing_eagerly()
                and trainer._collective_all_reduce_multi_worker(self.distribute_strategy)):
            return method(self)
        key = (method.__name__, tuple(id(v) for m in self.metrics for v in m.variables))
        functions = _compiled_metric_functions.setdefault(self, {})
        if key not in functions:
            model = weakref.ref(self)
            functions[key] = tf.function(lambda: method(model()), autograph=False)
        return functions[key]()

    return wrapper


def _multi_step_needed() -> bool:
    trainer = _tf_trainer_module()
    return _source_contains(trainer.TensorFlowTrainer._make_function, "multi_step_on_iterator",
                            "one_step_on_data = tf.function(", "tf.cond(")


def _install_multi_step() -> None:
    trainer = _tf_trainer_module()
    original = trainer.TensorFlowTrainer._make_function

    @functools.wraps(original)
    def _make_function(self, step_function):
        if (self.steps_per_execution == 1 or self.run_eagerly
                or not trainer._collective_all_reduce_multi_worker(self.distribute_strategy)):
            return original(self, step_function)
        if self.jit_compile:
            raise KerasCompatError(
                f"compile(steps_per_execution={self.steps_per_execution}, jit_compile=True) "
                "does not work under multi-worker MultiWorkerMirroredStrategy: Keras's "
                "multi-step loop fails there ('You must feed a value for placeholder "
                "tensor'), and disttrain's does not compile with XLA. Fix: compile with "
                "jit_compile=False, or with steps_per_execution=1."
            )
        return _multi_step_function(self, step_function)

    trainer.TensorFlowTrainer._make_function = _make_function


def _multi_step_function(model, step_function) -> Callable:
    """Keras's `train_function`/`test_function` contract for k = steps_per_execution > 1
    under multi-worker: `function(iterator)` runs up to k steps and returns the last
    step's logs, reduced across workers, or raises StopIteration when the data had
    no batch left."""
    import tensorflow as tf

    trainer = _tf_trainer_module()
    strategy = model.distribute_strategy
    limit = model.steps_per_execution

    @model._autoconvert_optionals
    def run_step(data):
        return strategy.run(step_function, args=(data,))

    def reduce(outputs):
        return trainer.reduce_per_replica(outputs, strategy, reduction="auto")

    @functools.partial(tf.function, reduce_retracing=True, autograph=False)
    def run_steps(iterator):
        # The loop carries Optionals whose element spec is known only once the
        # step is traced: empty Optionals get it from the traced branch.
        outputs = tf.experimental.Optional.empty(None)

        def body(step, _, batch):
            result = tf.experimental.Optional.from_value(run_step(batch.get_value()))
            outputs._element_spec = result.element_spec
            following = tf.cond(step + 1 < limit, iterator.get_next_as_optional, lambda: batch)
            return step + 1, result, following

        _, last, _ = tf.while_loop(
            lambda step, _, batch: tf.logical_and(step < limit, batch.has_value()),
            body, [tf.constant(0), outputs, iterator.get_next_as_optional()])
        last._element_spec = outputs.element_spec
        logs = tf.experimental.Optional.empty(None)

        def reduced():
            result = tf.experimental.Optional.from_value(reduce(last.get_value()))
            logs._element_spec = result.element_spec
            return result

        return tf.cond(last.has_value(), reduced, lambda: logs)

    one_step = tf.function(lambda data: reduce(run_step(data)), reduce_retracing=True,
                           autograph=False)

    def function(iterator):
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            logs = run_steps(iterator)
            if not logs.has_value():
                raise StopIteration
            return logs.get_value()
        outputs = None
        for _, data in zip(range(limit), iterator):
            outputs = one_step(data)
        return outputs

    return function


def _persistent_iterator_needed() -> bool:
    from keras.src.trainers.epoch_iterator import EpochIterator

    return _source_contains(EpochIterator._enumerate_iterator, "self.steps_per_epoch is None",
                            "self._current_iterator = iter(self._get_iterator())")


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

    trainer = _tf_trainer_module()
    adapter = epoch_iterator.data_adapter
    batches = epoch_iterator._num_batches
    if (epoch_iterator.steps_per_epoch is not None or not batches
            or type(adapter) not in (TFDatasetAdapter, ArrayDataAdapter)
            or not trainer._collective_all_reduce_multi_worker(
                epoch_iterator._distribute_strategy)):
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
    from tensorflow.python.data.ops.structured_function import StructuredFunctionWrapper

    pending, seen = [dataset], set()
    try:
        while pending:
            node = pending.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for value in vars(node).values():
                if isinstance(value, StructuredFunctionWrapper) and any(
                        t.dtype == tf.resource for t in value.function.captured_inputs):
                    return True
            pending.extend(node._inputs())
    except (AttributeError, TypeError, NotImplementedError):
        return True
    return False


def _install_persistent_iterator() -> None:
    trainer = _tf_trainer_module()
    cls = trainer.TFEpochIterator
    original_init, original_reset = cls.__init__, cls.reset
    original_enumerate = cls._enumerate_iterator

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._disttrain_at_pass_start = False
        dataset = _one_pass_dataset(self)
        self._disttrain_persistent = dataset is not None
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
        if not getattr(self, "_disttrain_persistent", False):
            yield from original_enumerate(self)
            return
        self._disttrain_at_pass_start = False
        batches = self.steps_per_epoch
        for begin, end, iterator in original_enumerate(self):
            if begin + self.steps_per_execution > batches:
                # The epoch's last call runs only the batches left in this pass.
                iterator = itertools.islice(iterator, batches - begin)
            yield begin, end, iterator
        self._disttrain_at_pass_start = True

    cls.__init__, cls.reset, cls._enumerate_iterator = __init__, reset, _enumerate_iterator


def _batchnorm_needed() -> bool:
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    return not _source_contains(BatchNormalization.build, "aggregation")


_bn_sync_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batchnorm_statistics(model) -> list:
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    return [
        v
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, BatchNormalization)
        for v in layer.non_trainable_variables
    ]


def sync_batchnorm_statistics(model) -> None:
    """Averages the model's BatchNormalization moving statistics across workers.

    One batched all-reduce, after a barrier: every worker must call it at the
    same point; fit, evaluate and predict do (see `synced_batchnorm_statistics`),
    and disttrain's ModelCheckpoint and BackupAndRestore do before they save. A
    worker that calls `evaluate` or `predict` alone (both are collective under
    MWMS) then fails with a `CoordinationError` naming the missing peers after
    the coordination timeout, instead of hanging in the all-reduce. A no-op, with
    no barrier, outside multi-worker training and for models without
    BatchNormalization.
    """
    if "synced_batchnorm_statistics" not in _applied or not getattr(model, "built", False):
        return
    trainer = _tf_trainer_module()
    strategy = model.distribute_strategy
    if not trainer._collective_all_reduce_multi_worker(strategy):
        return
    from disttrain import coordination

    if model not in _bn_sync_functions:
        _bn_sync_functions[model] = _make_bn_sync(strategy, _batchnorm_statistics(model))
    sync = _bn_sync_functions[model]
    if sync is None:
        return
    coordination.get().barrier("keras_compat.sync_batchnorm_statistics")
    sync()


def _make_bn_sync(strategy, variables: list) -> Callable[[], None] | None:
    """The compiled all-reduce of `variables`; None when there are none (every
    worker has the same model, so all skip the barrier too)."""
    import tensorflow as tf

    if not variables:
        return None

    def average_on_replica():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce("MEAN", [tf.identity(v.value) for v in variables])
        for variable, mean in zip(variables, means):
            variable.assign(mean)

    @tf.function
    def sync():
        strategy.run(average_on_replica)

    return sync


def _install_batchnorm() -> None:
    from keras.src.callbacks.callback_list import CallbackList

    trainer = _tf_trainer_module()

    def synced_first(method, model_of):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            model = model_of(self)
            if model is not None:
                sync_batchnorm_statistics(model)
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("evaluate", "predict"):
        setattr(trainer.TensorFlowTrainer, name,
                synced_first(getattr(trainer.TensorFlowTrainer, name), lambda m: m))
    for name in ("on_epoch_end", "on_train_end"):
        setattr(CallbackList, name,
                synced_first(getattr(CallbackList, name), lambda c: getattr(c, "model", None)))


_FIXES = (
    _Fix(
        "symbolic_build_local_batch",
        "keras-team/keras#20585, keras-team/keras#20329, tensorflow/tensorflow#72388",
        _symbolic_build_needed,
        _install_symbolic_build,
    ),
    _Fix(
        "scalar_metric_reduction",
        "keras-team/keras#20585, ray-project/ray#47464",
        _scalar_reduction_needed,
        _install_scalar_reduction,
    ),
    _Fix(
        "multi_worker_steps_per_execution",
        "measured here (keras 3.15.1): the multi-step loop fails under multi-worker MWMS",
        _multi_step_needed,
        _install_multi_step,
    ),
    _Fix(
        "persistent_epoch_iterator",
        "measured here (keras 3.15.1): a new distributed iterator twice per epoch and a "
        "has-data all-reduce per step",
        _persistent_iterator_needed,
        _install_persistent_iterator,
    ),
    _Fix(
        "synced_batchnorm_statistics",
        "measured here (keras 3.15.1): BatchNormalization moving statistics use "
        "aggregation='none' and drift apart per worker",
        _batchnorm_needed,
        _install_batchnorm,
    ),
)


def apply(skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Applies every fix the installed Keras needs, once per process.

    Safe to call many times and from several threads: the first call decides.
    Does nothing when `DISTTRAIN_KERAS_COMPAT=0`.

    Args:
        skip: names of fixes to leave out (to measure what a fix changes).

    Returns:
        The applied fixes: name → upstream reference.

    Raises:
        KerasCompatError: when Keras is not version 3 on the TensorFlow backend,
            or `skip` names an unknown fix.
    """
    global _checked
    unknown = set(skip) - {fix.name for fix in _FIXES}
    if unknown:
        raise KerasCompatError(
            f"skip={sorted(unknown)!r} names no fix. Fix: use names from "
            f"{[fix.name for fix in _FIXES]!r}."
        )
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return {}
    with _lock:
        if _checked:
            return dict(_applied)
        import keras

        major = int(keras.__version__.split(".")[0])
        if major != 3 or keras.backend.backend() != "tensorflow":
            raise KerasCompatError(
                f"disttrain needs Keras 3 on the TensorFlow backend; found keras=="
                f"{keras.__version__} with backend {keras.backend.backend()!r}. Fix: "
                "pip install 'keras>=3' and set KERAS_BACKEND=tensorflow."
            )
        for fix in _FIXES:
            if fix.name in skip:
                _log.warning("keras_compat: %s skipped on request", fix.name)
            elif fix.is_needed():
                fix.install()
                _applied[fix.name] = fix.upstream
            else:
                _log.info("keras_compat: %s not needed for keras %s", fix.name, keras.__version__)
        _checked = True
        return dict(_applied)


def applied() -> dict[str, str]:
    """The fixes applied in this process so far (name → upstream reference)."""
    return dict(_applied)
