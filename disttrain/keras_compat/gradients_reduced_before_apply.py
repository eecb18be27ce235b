"""Fix `gradients_reduced_before_apply`: the optimizer works on the all-reduced gradient.

Keras 3's TensorFlow optimizer clips each replica's own gradient and only sums
the replicas' gradients afterwards, inside its update step; `LossScaleOptimizer`
decides from each replica's own gradient whether the step is finite; and the sum
of `IndexedSlices` gradients (Embedding and other gathers) concatenates the
replicas' slices, so an index appears once per replica, which Adam-like
optimizers (whose update is not linear in the gradient) do not merge. With this
fix the gradients are summed across replicas (through
`TFOptimizer._all_reduce_sum_gradients`, so `disttrain.gradient_compression`
still applies) before anything else sees them, the duplicate indices of every
sparse gradient are merged, and clipping, loss-scale finiteness, weight decay
and the update all work on that one gradient, as tf_keras did: the same update
as one process on the same global batch.
See `docs/keras_compat.md#gradients_reduced_before_apply`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from disttrain.keras_compat import _patch, detection

NAME = "gradients_reduced_before_apply"
UPSTREAM = ("measured here (keras 3.15.1): clipping and loss-scale finiteness per replica, "
            "sparse gradients' duplicate indices not merged; to file at keras-team/keras")

_REDUCED = "_disttrain_gradients_reduced"


def is_needed() -> bool:
    """Whether Keras's TensorFlow optimizer sums the replicas' gradients only inside
    `_backend_update_step`, after `_backend_apply_gradients` has clipped them.

    Raises:
        detection.TargetNotFound: the optimizer methods this fix wraps or calls are
            missing.
    """
    from keras.src.backend.tensorflow.optimizer import TFOptimizer  # private: keras.src
    from keras.src.optimizers.loss_scale_optimizer import (  # private: keras.src
        LossScaleOptimizer,
    )

    for name in ("_all_reduce_sum_gradients", "_distributed_tf_update_step"):
        detection.find(TFOptimizer, name)
    detection.find(LossScaleOptimizer, "apply")
    apply_gradients = detection.find(TFOptimizer, "_backend_apply_gradients")
    update_step = detection.find(TFOptimizer, "_backend_update_step")
    if not detection.source_contains(apply_gradients, "_clip_gradients"):
        raise detection.TargetNotFound("_backend_apply_gradients no longer clips")
    return detection.source_contains(update_step, "_all_reduce_sum_gradients")


def install() -> None:
    """Wraps `TFOptimizer._backend_apply_gradients`, `TFOptimizer._backend_update_step`
    and `LossScaleOptimizer.apply`."""
    from keras.src.backend.tensorflow.optimizer import TFOptimizer  # private: keras.src
    from keras.src.optimizers.loss_scale_optimizer import (  # private: keras.src
        LossScaleOptimizer,
    )

    _patch.wrap(TFOptimizer, "_backend_apply_gradients", _reducing_first, by=NAME)
    _patch.wrap(TFOptimizer, "_backend_update_step", _update_without_second_sum, by=NAME)
    _patch.wrap(LossScaleOptimizer, "apply", _loss_scale_reducing_first, by=NAME)


def _reducing_first(apply_gradients: Callable) -> Callable:
    @functools.wraps(apply_gradients)
    def _backend_apply_gradients(self, grads, trainable_variables):
        if getattr(self, _REDUCED, 0):
            return apply_gradients(self, grads, trainable_variables)
        grads = reduce_gradients(self, grads, trainable_variables)
        with _reduced(self):
            return apply_gradients(self, grads, trainable_variables)

    return _backend_apply_gradients


def _update_without_second_sum(update_step: Callable) -> Callable:
    @functools.wraps(update_step)
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not getattr(self, _REDUCED, 0):
            return update_step(self, grads, trainable_variables, learning_rate)
        import tensorflow as tf
        from keras.src import backend  # private: keras.src

        variables = [v.value if isinstance(v, backend.Variable) else v
                     for v in trainable_variables]
        return tf.__internal__.distribute.interim.maybe_merge_call(  # private: tf.__internal__
            self._distributed_tf_update_step, self._distribution_strategy,
            list(zip(grads, variables)), learning_rate)

    return _backend_update_step


def _loss_scale_reducing_first(loss_scale_apply: Callable) -> Callable:
    @functools.wraps(loss_scale_apply)
    def apply(self, grads, trainable_variables=None):
        if getattr(self, _REDUCED, 0):
            return loss_scale_apply(self, grads, trainable_variables)
        variables = (trainable_variables if trainable_variables is not None
                     else self._trainable_variables)
        grads = reduce_gradients(self, grads, variables)
        with _reduced(self), _reduced(self.inner_optimizer):
            return loss_scale_apply(self, grads, trainable_variables)

    return apply


def reduce_gradients(optimizer, grads: list, variables: list) -> list:
    """The replicas' gradients summed (when there are several replicas), with the
    duplicate indices of every `IndexedSlices` gradient merged.

    Args:
        optimizer: the Keras optimizer about to apply them (its
            `_all_reduce_sum_gradients` sums them, as Keras's update step would).
        grads: this replica's gradients (None for a variable without one).
        variables: the variables they belong to.

    Returns:
        One gradient per variable, identical on every replica.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    grads = list(grads)
    if (context is not None and context.num_replicas_in_sync > 1
            and any(g is not None for g in grads)):
        pairs = list(zip(grads, variables))
        grads = [g for g, _ in optimizer._all_reduce_sum_gradients(pairs)]  # private: keras.src
    return [merge_duplicate_indices(g) for g in grads]


def merge_duplicate_indices(gradient):
    """`gradient` with each index of an `IndexedSlices` once, its slices summed
    (other gradients are returned as they are).

    Example:

    >>> import tensorflow as tf
    >>> g = tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0]]), tf.constant([3, 1, 3]))
    >>> merged = merge_duplicate_indices(g)
    >>> merged.indices.numpy().tolist(), merged.values.numpy().ravel().tolist()
    ([3, 1], [5.0, 2.0])
    """
    import tensorflow as tf

    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    unique, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.size(unique))
    return tf.IndexedSlices(values, unique, gradient.dense_shape)


@contextlib.contextmanager
def _reduced(optimizer) -> Iterator[None]:
    """Marks `optimizer` as applying already reduced gradients while the block runs
    (a count: the replicas of one process trace the step in turns)."""
    setattr(optimizer, _REDUCED, getattr(optimizer, _REDUCED, 0) + 1)
    try:
        yield
    finally:
        setattr(optimizer, _REDUCED, getattr(optimizer, _REDUCED) - 1)
