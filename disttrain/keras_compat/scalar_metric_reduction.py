"""Fix `scalar_metric_reduction`: reduce a step's scalar logs across workers.

Rank-0 values are reduced with `axis=None`, all scalars of one dtype in one
all-reduce; the epoch's metric reads and resets run compiled under multi-worker.
See `docs/keras_compat.md#scalar_metric_reduction`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

from disttrain.keras_compat import _patch, detection

NAME = "scalar_metric_reduction"
UPSTREAM = "keras-team/keras#20585, ray-project/ray#47464"

_compiled_metric_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_needed() -> bool:
    """Whether Keras reduces every per-replica value with `axis=0`.

    Raises:
        detection.TargetNotFound: `reduce_per_replica`, a helper it calls, or the
            trainer's `get_metrics_result`/`reset_metrics` is missing.
    """
    module, trainer = detection.tf_trainer(), detection.trainer_class()
    for name in ("_collective_all_reduce_multi_worker", "_is_per_replica_instance"):
        detection.find(module, name)  # private: keras trainer module helpers
    for name in ("get_metrics_result", "reset_metrics"):
        detection.find(trainer, name)
    return detection.source_contains(detection.find(module, "reduce_per_replica"),
                                     'strategy.reduce("MEAN", v, axis=0)')


def install() -> None:
    """Wraps `reduce_per_replica`; compiles `get_metrics_result` and `reset_metrics`."""
    trainer = detection.tf_trainer()
    _patch.wrap(trainer, "reduce_per_replica", _reducing_scalars_together, by=NAME)
    trainer_class = detection.trainer_class()
    _patch.wrap(trainer_class, "get_metrics_result", _compiled_metrics_result, by=NAME)
    _patch.wrap(trainer_class, "reset_metrics", _compiled_when_multi_worker, by=NAME)


def _compiled_metrics_result(get_metrics_result: Callable) -> Callable:
    from keras.src.utils.python_utils import pythonify_logs  # private: keras.src

    # Keras up to 3.13 turns the results into Python numbers inside the method (its
    # callers do from 3.14 on); inside a tf.function that must happen after the call.
    after = (pythonify_logs if detection.source_contains(get_metrics_result, "pythonify_logs")
             else None)
    return _compiled_when_multi_worker(get_metrics_result, after)


def _reducing_scalars_together(original: Callable) -> Callable:
    """Keras's `reduce_per_replica` with every rank-0 value reduced with `axis=None`, those
    of one dtype in one all-reduce, under multi-worker."""
    import tensorflow as tf
    from keras.src import tree  # private: keras.src.tree

    trainer = detection.tf_trainer()

    def _local(v):
        return v.values[0] if trainer._is_per_replica_instance(v) else v  # private: keras

    def _mean_of_scalars(strategy, scalars: list) -> list:
        # A metric's result() may be its variable (a Keras variable's dtype is a string).
        stacked = strategy.run(lambda *xs: tf.stack([tf.convert_to_tensor(x) for x in xs]),
                               args=tuple(scalars))
        return tf.unstack(strategy.reduce("MEAN", stacked, axis=None), num=len(scalars))

    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        multi_worker = trainer._collective_all_reduce_multi_worker(strategy)  # private: keras
        if not multi_worker or reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)
        flat = tree.flatten(values)
        reduced = list(flat)
        scalars_by_dtype: dict = {}
        for i, v in enumerate(flat):
            if v is None:
                continue
            if tf.TensorShape(_local(v).shape).rank == 0:
                scalars_by_dtype.setdefault(tf.as_dtype(_local(v).dtype), []).append(i)
            else:
                reduced[i] = original(v, strategy, reduction)
        for indices in scalars_by_dtype.values():
            means = _mean_of_scalars(strategy, [flat[i] for i in indices])
            for i, mean in zip(indices, means):
                reduced[i] = mean
        return tree.pack_sequence_as(values, reduced)

    return reduce_per_replica


def _compiled_when_multi_worker(method: Callable, after: Callable | None = None) -> Callable:
    """`method(model)` run as a `tf.function` when called eagerly under multi-worker MWMS.

    One function per model and set of metric variables (a metric built later, or a
    recompile, gets a new one); inside a traced step the method runs as is.
    `after`, when given, is applied to what the compiled function returns.

    Each function wraps its own `functools.partial`: TensorFlow counts traces per
    Python code object, so functions made from one shared lambda added up their
    single traces into a false "triggered tf.function retracing" warning.
    """
    import tensorflow as tf

    @functools.wraps(method)
    def wrapper(self):
        if not (tf.executing_eagerly() and detection.is_multi_worker(self.distribute_strategy)):
            return method(self)
        key = (method.__name__, tuple(id(v) for m in self.metrics for v in m.variables))
        functions = _compiled_metric_functions.setdefault(self, {})
        if key not in functions:
            functions[key] = tf.function(
                functools.partial(_call_on, method, weakref.ref(self)), autograph=False)
        result = functions[key]()
        return after(result) if after is not None else result

    return wrapper


def _call_on(method: Callable, model: weakref.ref) -> object:
    """`method` of the model `model` refers to (held weakly: the compiled functions are
    cached per model in a `WeakKeyDictionary`)."""
    return method(model())
