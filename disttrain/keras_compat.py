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
  batch only provides shapes and dtypes). Upstream: keras-team/keras#20585,
  #20329, tensorflow/tensorflow#72388.
- `scalar_metric_reduction`: `reduce_per_replica` reduces each step's scalar
  metrics with `strategy.reduce("MEAN", v, axis=0)` on multi-worker, which
  raises "Invalid reduction dimension 0 for input with 0 dimensions". We
  reduce rank-0 values with `axis=None` (mean over replicas), so every worker
  logs the same value. Upstream: keras-team/keras#20585, ray-project/ray#47464.
  Epoch-level logs are read by Keras from the metric variables, which are
  summed across all workers, so they are exact global values.
- `synced_batchnorm_statistics`: BatchNormalization creates its moving
  statistics with `aggregation="none"`, so each worker keeps statistics of its
  own shard and checkpoints hold one shard's statistics. We create them with
  `aggregation="mean"`: each update is averaged across replicas (one small
  all-reduce per statistic per step), so every worker holds identical
  statistics, as tf_keras does.

Example:

>>> import disttrain.keras_compat as kc
>>> kc.apply()          # idempotent; disttrain.strategy() calls it for you
>>> sorted(kc.applied())  # doctest: +SKIP
['scalar_metric_reduction', 'symbolic_build_local_batch', 'synced_batchnorm_statistics']

Set `DISTTRAIN_KERAS_COMPAT=0` to leave Keras untouched (for comparisons).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import threading
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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                strategy = self.distribute_strategy
                data_batch = tree.map_structure(
                    lambda x: strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues)
                    else x,
                    batch,
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def _scalar_reduction_needed() -> bool:
    trainer = _tf_trainer_module()
    return _source_contains(trainer.reduce_per_replica, 'strategy.reduce("MEAN", v, axis=0)')


def _install_scalar_reduction() -> None:
    from keras.src import tree

    trainer = _tf_trainer_module()
    original = trainer.reduce_per_replica

    def _rank(v) -> int | None:
        if trainer._is_per_replica_instance(v):
            v = v.values[0]
        return v.shape.rank

    def reduce_per_replica(values, strategy, reduction):
        multi_worker = trainer._collective_all_reduce_multi_worker(strategy)
        if not multi_worker or reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)

        def _reduce(v):
            if _rank(v) == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return tree.map_structure(_reduce, values)

    reduce_per_replica.__wrapped__ = original
    trainer.reduce_per_replica = reduce_per_replica


def _batchnorm_needed() -> bool:
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    return not _source_contains(BatchNormalization.build, "aggregation")


def _install_batchnorm() -> None:
    from keras.src.layers.layer import Layer
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    def add_weight(self, *args, **kwargs):
        if kwargs.get("trainable") is False and kwargs.get("aggregation", "none") == "none":
            kwargs["aggregation"] = "mean"
        return Layer.add_weight(self, *args, **kwargs)

    add_weight.__doc__ = Layer.add_weight.__doc__
    BatchNormalization.add_weight = add_weight


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
        "synced_batchnorm_statistics",
        "measured here: Keras 3 BatchNormalization moving stats use aggregation='none'",
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
