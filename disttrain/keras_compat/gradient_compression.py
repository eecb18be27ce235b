"""Opt-in gradient compression: all-reduce float32 gradients as bfloat16 or float16.

Keras 3's TensorFlow optimizer sums the replicas' gradients with one
all-reduce (`_all_reduce_sum_gradients`) before applying them. With
compression, each float32 gradient is cast to 16 bits before that all-reduce
and back to float32 after it, so the bytes every worker sends and receives per
step are halved, like Horovod's `Compression.fp16` and PyTorch DDP's
bf16/fp16 compress hooks. The sum itself is computed in 16 bits: `bf16` keeps
float32's range with 8 bits of mantissa; `fp16` keeps 11 bits but overflows
above 65504 (large gradients become Inf).

Only dense float32 gradients under a multi-worker strategy are compressed;
sparse gradients (`IndexedSlices`), other dtypes and single-process training
are left as they are. Off by default: it changes the results.

Example (`disttrain.strategy()` installs it):

```python
strategy = disttrain.strategy(gradient_compression="bf16")
```
"""

from __future__ import annotations

import functools

from disttrain.errors import StrategyError
from disttrain.keras_compat import _patch

NAME = "gradient_compression"
CHOICES = ("none", "bf16", "fp16")

_dtype_name: str | None = None


def install(compression: str) -> None:
    """Compresses the gradient all-reduce of every Keras optimizer in this process.

    Args:
        compression: "none", "bf16" or "fp16".

    Raises:
        StrategyError: `compression` is not one of `CHOICES`.
    """
    global _dtype_name
    check(compression)
    _dtype_name = {"none": None, "bf16": "bfloat16", "fp16": "float16"}[compression]
    from keras.src.backend.tensorflow.optimizer import TFOptimizer  # private: keras.src

    _patch.wrap(TFOptimizer, "_all_reduce_sum_gradients", _compressing,  # private: keras
                by=NAME)


def check(compression: str) -> None:
    """Raises `StrategyError` unless `compression` is one of `CHOICES`."""
    if compression not in CHOICES:
        raise StrategyError(
            f"gradient_compression={compression!r} is not supported. Fix: use one of "
            f"{', '.join(repr(c) for c in CHOICES)} (\"none\", the default, sends float32)."
        )


def _compressing(all_reduce_sum):
    import tensorflow as tf

    @functools.wraps(all_reduce_sum)
    def wrapper(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        context = tf.distribute.get_replica_context()
        if (_dtype_name is None or context is None
                or context.num_replicas_in_sync == 1
                or not isinstance(tf.distribute.get_strategy(),
                                  tf.distribute.MultiWorkerMirroredStrategy)):
            return all_reduce_sum(self, grads_and_vars)
        compressed = [(tf.cast(g, _dtype_name), v) if _is_dense_float32(g) else (g, v)
                      for g, v in grads_and_vars]
        reduced = all_reduce_sum(self, compressed)
        return [(tf.cast(r, tf.float32), v) if _is_dense_float32(g) else (r, v)
                for (g, _), (r, v) in zip(grads_and_vars, reduced)]

    return wrapper


def _is_dense_float32(gradient) -> bool:
    import tensorflow as tf

    return isinstance(gradient, tf.Tensor) and gradient.dtype == tf.float32
