"""Resuming inside an epoch: the next training epoch passes over batches already trained.

Keras 3 resumes only at epoch boundaries (`model._initial_epoch`). A backup taken
mid-epoch (an integer `save_freq`, or a preemption) records how many batches of
its epoch were trained; `skip_batches_of_next_epoch(n)` makes the next training
epoch draw those `n` batches from its input iterator without training on them
and without calling batch callbacks for them. With a deterministic input order
(e.g. `shuffle=False`, or a dataset shuffled with a fixed seed per epoch), the
rest of the epoch then trains on exactly the batches an uninterrupted run would
have, and batch callbacks see the same batch numbers.

It works by wrapping Keras's `TFEpochIterator` enumeration (installed once, on
first use); the request is consumed by the first epoch enumerated after it, so
`BackupAndRestore` makes it in `on_epoch_begin`, right before `fit` starts the
epoch's loop.

Example:

```python
resume.skip_batches_of_next_epoch(120)   # in a callback's on_epoch_begin
```
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_pending = 0
_installed = False


def skip_batches_of_next_epoch(batches: int) -> None:
    """Asks the next training epoch to pass over its first `batches` batches."""
    global _pending
    if batches < 0:
        raise ValueError(f"batches={batches} must be >= 0")
    _install()
    with _lock:
        _pending = batches


def cancel() -> None:
    """Drops a request no epoch has consumed (e.g. `fit` ended first)."""
    global _pending
    with _lock:
        _pending = 0


def _take() -> int:
    global _pending
    with _lock:
        batches, _pending = _pending, 0
    return batches


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        from keras.src.backend.tensorflow.trainer import TFEpochIterator

        original = TFEpochIterator._enumerate_iterator

        def enumerate_skipping_trained_batches(self):
            skip = _take()
            steps = original(self)
            if skip:
                steps = _skip(steps, skip)
            yield from steps

        TFEpochIterator._enumerate_iterator = enumerate_skipping_trained_batches
        _installed = True


def _skip(steps, skip: int):
    import tensorflow as tf

    for begin, end, iterator in steps:
        if end < skip:
            try:
                for _ in range(end - begin + 1):
                    next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                return
            continue
        yield begin, end, iterator
