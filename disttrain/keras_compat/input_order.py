"""Input order: Keras's own shuffle of NumPy arrays and `PyDataset`s, drawn alike on every worker.

`fit(x, y, shuffle=True)` (the default) shuffles NumPy arrays and tensors with a
`tf.random.shuffle` inside Keras's input pipeline (`shuffle="batch"`: one per batch),
and a `PyDataset`'s batch order with Python's `random.shuffle`. Under multi-worker MWMS every worker builds that
whole order and keeps every N-th batch of it, so the orders must be the same:

- **No global seed** (`keras.utils.set_random_seed` not called): each process
  draws its own order, and in every epoch some samples train twice and others
  never. The input check's exchange agrees one seed (the chief's draw) and the
  shuffle draws from it on every worker: a new order each epoch, the same on all.
- **A global seed**: Keras's first order is the same everywhere, and a one-process
  `fit` replays it every epoch (its new iterator per epoch restarts the shuffle);
  disttrain's persistent iterator would reshuffle from epoch 2. The arrays'
  order is then drawn once by Keras's own pipeline over the sample indices (a new
  iterator, as one process draws it) and replayed each pass, so the order on N
  workers is one process's order in every epoch (`shuffle="batch"` included: its
  batches one after another are a permutation too).

Installed with the input check by `call_checks` (one registered patch of Keras's
array adapter); active only inside a multi-worker call that the input check wraps in
`agreed(...)`. Inside that call it also swaps `tf.random.shuffle` while Keras builds
the arrays' pipeline, and a `PyDataset` adapter's `random` for the agreed seed; both
are put back when the call (or the build) ends, and are not in the register.
See `docs/keras_compat.md#input-order`.

Example:

```python
with input_order.agreed(seed=None, multi_worker=True):   # a global seed is set
    model.fit(x, y, epochs=3)      # every epoch: the permutation one process draws
```
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from disttrain.errors import KerasCompatError
from disttrain.keras_compat import _patch

NAME = "input_order"
_SHUFFLES = (True, "batch")
"""The `shuffle` values of `fit` with which Keras shuffles arrays and `PyDataset`s."""
_active = threading.local()


def install() -> None:
    """Makes Keras's NumPy-array pipeline read the agreed order (once per process)."""
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        ArrayDataAdapter,
    )

    _patch.wrap(ArrayDataAdapter, "get_tf_dataset", _ordered, by=NAME)


def _ordered(get_tf_dataset: Callable) -> Callable:
    @functools.wraps(get_tf_dataset)
    def wrapper(self):
        mode = getattr(_active, "mode", None)
        if mode is None or self._shuffle not in _SHUFFLES:
            return get_tf_dataset(self)
        kind, seed = mode
        if kind == "seeded":
            with _shuffle_replaced(_seeded(seed)):
                return get_tf_dataset(self)
        # A batch-shuffled epoch is a permutation too: its batches, one after another.
        permutation = _first_order(get_tf_dataset(_ids_like(self)), self)
        kept, self._shuffle = self._shuffle, True
        try:
            with _shuffle_replaced(lambda value, seed=None, name=None: permutation):
                return get_tf_dataset(self)
        finally:
            self._shuffle = kept

    return wrapper


def global_seed() -> int | None:
    """TensorFlow's global seed (`keras.utils.set_random_seed`, `tf.random.set_seed`), or None.

    Example:

    ```python
    keras.utils.set_random_seed(7); input_order.global_seed()   # 7
    ```
    """
    from tensorflow.python.eager import context  # private: tensorflow.python

    return context.global_seed()


@contextlib.contextmanager
def agreed(seed: int | None) -> Iterator[None]:
    """Inside, Keras's shuffles of arrays and `PyDataset`s draw the same order on every worker.

    Args:
        seed: the seed every worker agreed (the chief's draw) when no global seed is
            set; None when a global seed is set (Keras's own order, replayed each
            pass for arrays).

    Example:

    ```python
    with input_order.agreed(seed=1234):
        model.fit(x, y, epochs=3)
    ```
    """
    from keras.src.trainers.data_adapters import py_dataset_adapter  # private: keras.src

    previous = getattr(_active, "mode", None)
    _active.mode = ("seeded", seed) if seed is not None else ("replay", None)
    kept = py_dataset_adapter.random
    if seed is not None:
        # A PyDataset's batch order: Keras calls `random.shuffle` of its module.
        py_dataset_adapter.random = random.Random(seed)
    try:
        yield
    finally:
        _active.mode = previous
        py_dataset_adapter.random = kept


def _seeded(seed: int) -> Callable:
    """What stands for `tf.random.shuffle` while Keras builds the arrays' pipeline in an
    agreed-seed call: the same shuffle, with the agreed seed as its op seed."""
    import tensorflow as tf

    shuffle = tf.random.shuffle
    return lambda value, seed_=None, name=None: shuffle(value, seed=seed)


def _ids_like(adapter: Any) -> Any:
    """An adapter like `adapter` over the sample ids alone: Keras's pipeline for it has the
    same index stages, and building it converts 8 bytes per sample, not the arrays."""
    import numpy as np
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        ArrayDataAdapter,
    )

    return ArrayDataAdapter(np.arange(adapter._num_samples, dtype="int64"),
                            batch_size=adapter._batch_size, shuffle=adapter._shuffle)


def _first_order(dataset: Any, adapter: Any) -> Any:
    """The sample order of the first pass of a new iterator over `dataset`, Keras's
    pipeline for `adapter`: what one process trains in every epoch.

    Only the pipeline's index stages run (Keras's own traced functions: its permutation,
    or its per-batch shuffles, with the seeds it gave them), not the slicing of the data:
    about 0.1 s per million samples instead of several seconds (`docs/parity.md`).
    """
    import tensorflow as tf

    batches = _index_batches(dataset)
    if adapter._shuffle == "batch":
        # One element: every batch as a row, the short last one padded at its end.
        rows = batches.padded_batch(adapter.num_batches,
                                    padding_values=tf.constant(-1, tf.int64))
        return tf.reshape(rows.get_single_element(), [-1])[:adapter._num_samples]
    from tensorflow.python.data.ops import flat_map_op  # private: tensorflow.python

    if not isinstance(batches, flat_map_op._FlatMapDataset):
        raise _unknown_pipeline(batches)
    # Its batches are consecutive slices of one permutation: the element upstream.
    return batches._input_dataset.get_single_element()


def _index_batches(dataset: Any) -> Any:
    """The dataset of batched sample indices in Keras's array pipeline: the first
    dataset of the zip that slices the inputs by them."""
    from tensorflow.python.data.ops import zip_op  # private: tensorflow.python

    found = dataset
    while not isinstance(found, zip_op._ZipDataset):
        found = getattr(found, "_input_dataset", None)
        if found is None:
            raise _unknown_pipeline(dataset)
    return found._datasets[0]


def _unknown_pipeline(dataset: Any) -> KerasCompatError:
    import keras

    return KerasCompatError(
        f"keras {keras.__version__} builds its shuffled array pipeline in a way "
        f"disttrain's input order does not know ({type(dataset).__name__} where the "
        "index stages were expected), so one process's order cannot be replayed on N "
        "workers. Install a Keras version disttrain supports, or pass shuffle=False.")


@contextlib.contextmanager
def _shuffle_replaced(replacement) -> Iterator[None]:
    """`tf.random.shuffle` is `replacement` inside (Keras looks it up as it builds)."""
    import tensorflow as tf

    original = tf.random.shuffle
    tf.random.shuffle = replacement
    try:
        yield
    finally:
        tf.random.shuffle = original


def shuffled(call: str, arguments: dict[str, Any]) -> bool:
    """Whether `call` with these bound arguments runs Keras's shuffle of arrays or a
    `PyDataset` (fit with `shuffle=True`, its default, or `"batch"`, on such an `x`)."""
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        can_convert_arrays,
    )
    from keras.utils import PyDataset

    x = arguments.get("x")
    if call != "fit" or arguments.get("shuffle", True) not in _SHUFFLES or x is None:
        return False
    if isinstance(x, PyDataset):
        return True
    try:
        return can_convert_arrays((x,))
    except (TypeError, ValueError):
        return False
