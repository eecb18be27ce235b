"""The tf.data pipeline inspector: what a user's input pipeline holds, without iterating it.

A `tf.data.Dataset` keeps its input datasets (`_inputs()`) and the traced
functions of its `map`, `filter`, `interleave`...; walking them tells whether
TensorFlow will shard it by file, whether its passes differ, whether it reads
state a callback may change, its batch size and how many files feed it. The
input check, the preflight and the persistent epoch iterator all read
pipelines through this module. Where TensorFlow changed what the walk reads,
each question answers on the safe side (documented per function).

Example:

```python
from disttrain.keras_compat import pipeline

pipeline.batch_size(tf.data.Dataset.range(8).batch(4))   # 4
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

# TensorFlow's auto-shard rewrite splits by file when the pipeline holds one of
# these reader ops (any version suffix); without one, AUTO shards by element.
READER_OPS = ("TFRecordDataset", "TextLineDataset", "FixedLengthRecordDataset",
              "ArrayRecordDataset", "RecordIODataset", "SSTableDataset")

_INSPECTION_ERRORS = (AttributeError, TypeError, NotImplementedError)
_log = logging.getLogger(__name__)


def datasets(dataset: Any) -> Iterator[Any]:
    """Every dataset of the pipeline that ends in `dataset`, once each, outermost first."""
    pending, seen = [dataset], set()
    while pending:
        node = pending.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        pending.extend(node._inputs())  # private: tensorflow DatasetV2._inputs


def functions(node: Any) -> list[Any]:
    """The traced functions of one dataset of a pipeline (its `map`, `filter`... function)."""
    from tensorflow.python.data.ops.structured_function import (  # private: tensorflow.python
        StructuredFunctionWrapper,
    )

    return [value.function for value in vars(node).values()
            if isinstance(value, StructuredFunctionWrapper)]


def op_types(dataset: Any) -> Iterator[str]:
    """The dataset classes of the pipeline and the op types inside its functions."""
    for node in datasets(dataset):
        yield type(node).__name__
        for function in functions(node):
            graph = function.graph.as_graph_def()
            yield from (n.op for n in graph.node)
            yield from (n.op for f in graph.library.function for n in f.node_def)


def reads_files(dataset: Any) -> bool:
    """Whether the pipeline holds a file reader TensorFlow's auto-shard splits by file,
    as a dataset of its own or inside a function (`interleave`, `flat_map`); True,
    with a logged warning, when the pipeline cannot be inspected (then neither the
    input check nor the preflight's by-element notes apply to it)."""
    try:
        return any(kind.lstrip("_").startswith(READER_OPS) for kind in op_types(dataset))
    except _INSPECTION_ERRORS:
        _log.warning("keras_compat: cannot inspect this input pipeline (a TensorFlow "
                     "change?); it is treated as sharded by file and not checked")
        return True


def shards_itself(dataset: Any) -> bool:
    """Whether the pipeline calls `Dataset.shard` itself, as a dataset of its own or inside
    a function (`interleave`, `flat_map`). False when it cannot be inspected."""
    try:
        return any(kind.lstrip("_") == "ShardDataset" for kind in op_types(dataset))
    except _INSPECTION_ERRORS:
        return False


def cache_files(dataset: Any) -> list[str]:
    """The file name prefixes of the pipeline's `cache(filename)` steps (not in-memory
    caches), in pipeline order; empty when it cannot be inspected."""
    try:
        return [name for node in datasets(dataset)
                if (name := _cache_file(node))]
    except _INSPECTION_ERRORS:
        return []


def _cache_file(node: Any) -> str:
    filename = getattr(node, "_filename", None)  # private: tensorflow CacheDataset
    if type(node).__name__.lstrip("_") != "CacheDataset" or filename is None:
        return ""
    return filename.numpy().decode() if hasattr(filename, "numpy") else str(filename)


def reshuffles(dataset: Any) -> bool:
    """Whether the pipeline holds a `shuffle` that reshuffles each iteration or a
    `Dataset.random` that re-randomizes: seed generators the dataset owns."""
    return any(getattr(node, "_reshuffle_each_iteration", False)  # private: tensorflow
               or getattr(node, "_rerandomize_each_iteration", False)  # private: tensorflow
               for node in datasets(dataset))


def passes_differ(dataset: Any) -> bool:
    """Whether two passes over `dataset` may yield different batches: it `reshuffles`,
    or one of its functions holds a stateful op (e.g. `tf.random.uniform`). True when
    the pipeline cannot be inspected."""
    try:
        return reshuffles(dataset) or any(
            op.op_def.is_stateful for node in datasets(dataset)
            for function in functions(node) for op in function.graph.get_operations())
    except _INSPECTION_ERRORS:
        return True


def captures_state(dataset: Any) -> bool:
    """Whether a function of the pipeline (a `map`, `filter`, `interleave`...)
    captures a resource: a variable or lookup table a callback may change between
    epochs. True when the pipeline cannot be inspected."""
    import tensorflow as tf

    try:
        return any(t.dtype == tf.resource for node in datasets(dataset)
                   for function in functions(node) for t in function.captured_inputs)
    except _INSPECTION_ERRORS:
        return True


def batch_size(dataset: Any) -> int | None:
    """The batch size of the outermost `batch` in the pipeline, when known statically."""
    import tensorflow as tf

    for node in datasets(dataset):
        size = getattr(node, "_batch_size", None)  # private: tensorflow BatchDataset
        if size is not None:
            value = tf.get_static_value(size)
            return None if value is None else int(value)
    return None


def file_count(dataset: Any) -> int | None:
    """How many file names feed the pipeline's readers, when known."""
    import tensorflow as tf

    counts = [int(node.cardinality()) for node in datasets(dataset)
              if not node._inputs()  # private: tensorflow DatasetV2._inputs
              and node.element_spec == tf.TensorSpec((), tf.string)]
    known = [c for c in counts if c >= 0]
    return sum(known) if known and len(known) == len(counts) else None
