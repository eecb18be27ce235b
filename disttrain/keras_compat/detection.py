"""What every Keras fix uses to find the code it patches and when it applies.

A fix is installed only when the defective code is present in the installed
Keras, detected from its source, so an upstream fix switches ours off by itself.
"""

from __future__ import annotations

import inspect
from typing import Any


def source_contains(obj: object, *fragments: str) -> bool:
    """Whether the source of `obj` contains every one of `fragments`.

    False when the source cannot be read (a compiled or built-in object).

    Args:
        obj: a function, method or class.
        *fragments: pieces of code that the defective version contains.

    Example:

    >>> source_contains(source_contains, "inspect.getsource")
    True
    """
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return all(f in source for f in fragments)


def tf_trainer() -> Any:
    """Keras's TensorFlow trainer module (`keras.src.backend.tensorflow.trainer`)."""
    from keras.src.backend.tensorflow import trainer

    return trainer


def is_multi_worker(strategy: Any) -> bool:
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` spanning several workers."""
    return bool(tf_trainer()._collective_all_reduce_multi_worker(strategy))
