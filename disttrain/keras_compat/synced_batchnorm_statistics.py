"""Fix `synced_batchnorm_statistics`: BatchNormalization moving statistics averaged across workers.

They are averaged with one batched all-reduce wherever they can be observed: at
the start of `evaluate` and `predict`, before the callbacks' `on_epoch_end` and
`on_train_end`, and before disttrain's checkpoints and backups save.
See `docs/keras_compat.md#synced_batchnorm_statistics`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

from disttrain.keras_compat import _patch, detection

NAME = "synced_batchnorm_statistics"
UPSTREAM = ("measured here (keras 3.15.1): BatchNormalization moving statistics use "
            "aggregation='none' and drift apart per worker")

_sync_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_needed() -> bool:
    """Whether BatchNormalization creates its statistics without an aggregation.

    Raises:
        detection.TargetNotFound: `BatchNormalization.build` no longer creates
            `moving_mean`, or the trainer's `evaluate`/`predict` is missing.
    """
    from keras.layers import BatchNormalization

    for name in ("evaluate", "predict"):
        detection.find(detection.trainer_class(), name)
    build = detection.find(BatchNormalization, "build")
    if not detection.source_contains(build, "moving_mean"):
        raise detection.TargetNotFound("BatchNormalization.build does not create moving_mean")
    return not detection.source_contains(build, "aggregation")


def install() -> None:
    """Syncs before `evaluate`, `predict` and the callbacks' `on_epoch_end`/`on_train_end`."""
    from keras.src.callbacks.callback_list import CallbackList  # private: keras.src

    trainer_class = detection.trainer_class()

    def synced_first(method, model_of):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            model = model_of(self)
            if model is not None:
                sync_batchnorm_statistics(model)
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("evaluate", "predict"):
        _patch.wrap(trainer_class, name, lambda method: synced_first(method, lambda m: m),
                    by=NAME)
    for name in ("on_epoch_end", "on_train_end"):
        _patch.wrap(CallbackList, name,
                    lambda method: synced_first(method, lambda c: getattr(c, "model", None)),
                    by=NAME)


def sync_batchnorm_statistics(model) -> None:
    """Averages the model's BatchNormalization moving statistics across workers.

    One batched all-reduce, after a barrier: every worker must call it at the
    same point; fit, evaluate and predict do, and disttrain's ModelCheckpoint and
    BackupAndRestore do before they save. A worker that calls `evaluate` or
    `predict` alone (both are collective under MWMS) then fails with a
    `CoordinationError` naming the missing peers after the coordination timeout,
    instead of hanging in the all-reduce. A no-op, with no barrier, outside
    multi-worker training, for models without BatchNormalization and when the
    fix is not applied.

    Args:
        model: a Keras model (unbuilt models are left alone).

    Example:

    ```python
    disttrain.keras_compat.sync_batchnorm_statistics(model)   # on every worker
    model.save("model.keras")                                  # on the chief
    ```
    """
    if not _patch.installed(NAME) or not getattr(model, "built", False):
        return
    strategy = model.distribute_strategy
    if not detection.is_multi_worker(strategy):
        return
    from disttrain import coordination

    if model not in _sync_functions:
        _sync_functions[model] = _make_sync(strategy, _batchnorm_statistics(model))
    sync = _sync_functions[model]
    if sync is None:
        return
    coordination.get().barrier("keras_compat.sync_batchnorm_statistics")
    sync()


def _batchnorm_statistics(model) -> list:
    from keras.layers import BatchNormalization

    return [
        v
        for layer in model._flatten_layers(include_self=True, recursive=True)  # private: keras
        if isinstance(layer, BatchNormalization)
        for v in layer.non_trainable_variables
    ]


def _make_sync(strategy, variables: list) -> Callable[[], None] | None:
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
