"""Fix `symbolic_build_local_batch`: build the model from this worker's local batch.

See `docs/keras_compat.md#symbolic_build_local_batch`.
"""

from __future__ import annotations

from disttrain.keras_compat import _patch, detection

NAME = "symbolic_build_local_batch"
UPSTREAM = "keras-team/keras#20585, keras-team/keras#20329, tensorflow/tensorflow#72388"


def is_needed() -> bool:
    """Whether Keras builds from `strategy.reduce` of a per-replica batch.

    Raises:
        detection.TargetNotFound: the trainer, `_maybe_symbolic_build` or
            `_symbolic_build` is missing.
    """
    trainer = detection.trainer_class()
    detection.find(trainer, "_symbolic_build")  # private: keras Trainer._symbolic_build
    return detection.source_contains(
        # private: keras Trainer._maybe_symbolic_build
        detection.find(trainer, "_maybe_symbolic_build"),
        "distribute_strategy.reduce(")


def install() -> None:
    """Replaces the trainer's `_maybe_symbolic_build` (Keras's is not called)."""
    import keras
    import tensorflow as tf
    from keras.src import tree  # private: keras.src.tree

    def local_batches(epoch_iterator, strategy):
        # Each step is `(begin, end, iterator)` (Keras 3.11+) or `(step, iterator)`:
        # the iterator is replaced by a list of one local batch, as Keras expects.
        for *step, it in epoch_iterator:
            batch = tree.map_structure(
                lambda x: strategy.experimental_local_results(x)[0]
                if isinstance(x, tf.distribute.DistributedValues) else x,
                next(it))
            yield (*step, [batch])

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # A model without `call()` (e.g. a GAN that only overrides `train_step`)
        # cannot be built by calling it: like Keras without a strategy, its layers
        # and optimizers build where its own step first uses them.
        # private: keras Trainer._distribute_strategy
        if self._distribute_strategy is None or type(self).call is keras.Model.call:
            return
        # Keras's `_symbolic_build` draws from `iterator` only when something is
        # left to build: a built model leaves the epoch's iterator untouched. A
        # generator's or PyDataset's batch is taken as Keras peeked it instead: an
        # iterator drawn here and dropped would read ahead (prefetch) and lose what
        # it read of a generator.
        if iterator is not None and data_batch is None:
            data_batch = _peeked_batch(iterator.data_adapter)
        if iterator is not None and data_batch is None:
            iterator = local_batches(iterator, self.distribute_strategy)
        with self.distribute_strategy.scope():
            self._symbolic_build(iterator=iterator, data_batch=data_batch)  # private: keras

    _patch.wrap(detection.trainer_class(), "_maybe_symbolic_build",  # private: keras
                lambda _: _maybe_symbolic_build, by=NAME)


def _peeked_batch(adapter):
    """The first batch of a generator or `PyDataset` input without starting a pass over
    it (the generator's batch Keras peeked; the `PyDataset`'s batch 0), else None."""
    # private: keras.src
    from keras.src.trainers.data_adapters.generator_data_adapter import GeneratorDataAdapter
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    import numpy as np
    from keras.src import tree  # private: keras.src.tree

    if isinstance(adapter, GeneratorDataAdapter):
        batch = adapter._first_batches[0]  # private: keras GeneratorDataAdapter
    elif isinstance(adapter, PyDatasetAdapter):
        batch = adapter._standardize_batch(adapter.py_dataset[0])  # private: keras
    else:
        return None
    # Python numbers and lists as Keras's conversion to tensors would see them.
    return tree.map_structure(
        lambda v: v if v is None or hasattr(v, "shape") else np.asarray(v), batch)
