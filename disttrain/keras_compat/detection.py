"""What every Keras fix uses to find the code it patches and when it applies.

A fix's `is_needed()` tells three cases apart: the defective code is there (True:
install the fix), the code is there and fixed upstream (False: ours switches off
by itself), or the code it patches is not there at all (`TargetNotFound`: Keras
renamed, moved or removed it, and `keras_compat.apply()` refuses to go on
without the fix, naming it and the Keras version).
"""

from __future__ import annotations

import inspect
from typing import Any


class TargetNotFound(LookupError):
    """The Keras code a fix patches is missing from the installed Keras, or unreadable.

    Raised by `is_needed()`; `keras_compat.apply()` turns it into a
    `KerasCompatError` naming the fix and the Keras version.
    """


def find(owner: Any, name: str) -> Any:
    """`owner.name`, the code a fix patches or calls.

    Args:
        owner: a Keras module or class.
        name: the attribute's name.

    Raises:
        TargetNotFound: `owner` has no attribute `name`.

    Example:

    >>> find(inspect, "getsource") is inspect.getsource
    True
    """
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
        raise TargetNotFound(f"{owner_name}.{name} is missing") from None


def source_contains(obj: object, *fragments: str) -> bool:
    """Whether the source of `obj` contains every one of `fragments`.

    Args:
        obj: a function, method or class.
        *fragments: pieces of code that the defective version contains.

    Raises:
        TargetNotFound: the source cannot be read (a compiled or built-in object),
            so whether the defect is there cannot be told.

    Example:

    >>> source_contains(source_contains, "inspect.getsource")
    True
    """
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        raise TargetNotFound(f"the source of {obj!r} cannot be read") from None
    return all(f in source for f in fragments)


def tf_trainer() -> Any:
    """Keras's TensorFlow trainer module (`keras.src.backend.tensorflow.trainer`)."""
    from keras.src.backend.tensorflow import trainer  # private: keras.src

    return trainer


def trainer_class() -> type:
    """Keras's TensorFlow trainer class, the base of every Keras model on TensorFlow.

    `TensorFlowTrainer` up to Keras 3.15, `Trainer` from 3.16.

    Raises:
        TargetNotFound: the trainer module defines neither.
    """
    module = tf_trainer()
    for name in ("TensorFlowTrainer", "Trainer"):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            return cls
    raise TargetNotFound(f"{module.__name__} defines neither TensorFlowTrainer nor Trainer")


def is_multi_worker(strategy: Any) -> bool:
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` spanning several workers."""
    return bool(tf_trainer()._collective_all_reduce_multi_worker(strategy))  # private: keras
