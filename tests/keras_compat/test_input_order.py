"""The replayed order under a global seed is Keras's own order, drawn without slicing the data.

Single process: with `keras.utils.set_random_seed`, the order a worker replays in every
epoch (`input_order.agreed(None)`) must be the order a new iterator over Keras's own
pipeline trains (what one process trains in each epoch), element for element.
"""

from __future__ import annotations

import time

import numpy as np
import pytest


def _trained_ids(dataset) -> list[int]:
    """The sample ids one pass of `dataset` (arrays of ids as `x`) yields, in order."""
    return [int(i) for batch in dataset.as_numpy_iterator() for i in batch]


def _ids_adapter(samples: int, batch_size: int, shuffle):
    from keras.src.trainers.data_adapters.array_data_adapter import (  # private: keras.src
        ArrayDataAdapter,
    )

    return ArrayDataAdapter(np.arange(samples, dtype="int64"), batch_size=batch_size,
                            shuffle=shuffle)


@pytest.mark.parametrize("shuffle", [True, "batch"])
@pytest.mark.parametrize("samples,batch_size", [(1000, 32), (96, 8)])
def test_the_replayed_order_is_the_order_keras_draws(shuffle, samples, batch_size):
    """Keras's pipeline over sample ids (stock: two new iterators, each one process's
    epoch) against the replayed pipeline (two passes), with and without a short last
    batch: the same ids in the same order, every pass."""
    import keras

    from disttrain.keras_compat import input_order

    input_order.install()
    keras.utils.set_random_seed(11)
    stock = _ids_adapter(samples, batch_size, shuffle).get_tf_dataset()
    keras_order = _trained_ids(stock)
    assert _trained_ids(stock) == keras_order  # a new iterator draws the same again
    assert sorted(keras_order) != keras_order and sorted(keras_order) == list(range(samples))
    with input_order.agreed(None):
        replayed = _ids_adapter(samples, batch_size, shuffle).get_tf_dataset()
    assert _trained_ids(replayed) == keras_order
    assert _trained_ids(replayed) == keras_order
    keras.utils.set_random_seed(12)
    with input_order.agreed(None):
        other = _trained_ids(_ids_adapter(samples, batch_size, shuffle).get_tf_dataset())
    assert other != keras_order  # the seed decides the order


@pytest.mark.parametrize("shuffle", [True, "batch"])
def test_drawing_the_order_costs_well_under_one_pass_of_keras_pipeline(shuffle):
    """Only the index stages of Keras's pipeline run, not the slicing of every batch:
    the draw for 300k samples takes under half of one pass of Keras's own pipeline,
    timed in the same process (load-proof; the old draw iterated that whole pass, 5.6 s
    per million samples here, so it took more than one pass)."""
    import keras
    import tensorflow as tf

    from disttrain.keras_compat import input_order

    input_order.install()
    keras.utils.set_random_seed(11)
    with input_order.agreed(None):  # traces Keras's functions outside the timing
        _ids_adapter(32, 32, shuffle).get_tf_dataset()
    adapter = _ids_adapter(300_000, 32, shuffle)
    started = time.perf_counter()
    with input_order.agreed(None):
        dataset = adapter.get_tf_dataset()
    draw = time.perf_counter() - started
    started = time.perf_counter()
    for _ in adapter.get_tf_dataset():
        pass
    one_pass = time.perf_counter() - started
    assert draw < 0.5 * one_pass, (draw, one_pass)
    first = next(iter(dataset))
    assert first.dtype == tf.int64 and first.shape == (32,)


def test_a_pipeline_without_keras_index_stages_is_refused_by_name():
    """If a Keras version builds its array pipeline otherwise, the draw stops with
    KerasCompatError naming the version and the way out, instead of replaying a guess."""
    import keras
    import tensorflow as tf

    from disttrain.errors import KerasCompatError
    from disttrain.keras_compat import input_order

    with pytest.raises(KerasCompatError, match=keras.__version__) as raised:
        input_order._first_order(tf.data.Dataset.range(3).map(lambda i: i),
                                 _ids_adapter(3, 1, True))
    assert "shuffle=False" in str(raised.value)
