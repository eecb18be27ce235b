"""The random state a worker's training input stream starts from, recorded and restored.

A pipeline whose `tf.py_function`/`numpy_function` maps or generators draw from
Python's `random`, NumPy's global generator or TensorFlow's global
`tf.random.Generator` yields another stream when a restarted process seeds
them otherwise (or not at all), even though `BackupAndRestore` replays the
input from its start (`docs/resume.md#what-the-input-resumes-from`). So each
worker records those three states when its training input stream starts,
before any element is drawn (`InputStream.stream_starts`, called by the epoch
iterator when it makes a new training iterator); `BackupAndRestore` saves that record
in the worker's part of each backup, and on resume hands it back (`carry`) to
be restored when the replayed stream starts, which records it again as the
stream's start.

Example:

```python
from disttrain.resume import input_state

state = input_state.capture()   # Python, NumPy and tf.random global generator states
input_state.restore(state)
```
"""

from __future__ import annotations

import contextlib
import gc
import random
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np


def capture() -> dict[str, Any]:
    """This process's Python `random`, NumPy global and `tf.random` global generator
    states, as JSON-serializable data (`tensorflow` is None while no global generator
    exists: none is created here).

    Example:

    >>> state = capture()
    >>> sorted(state)
    ['numpy', 'python', 'tensorflow']
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    generator = _global_generator()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "tensorflow": None if generator is None else {
            "state": generator.state.numpy().tolist(), "algorithm": int(generator.algorithm)},
    }


def _global_generator():
    """TensorFlow's global `tf.random.Generator` if one was made, else None."""
    from tensorflow.python.ops import stateful_random_ops  # private: tensorflow.python

    return getattr(stateful_random_ops, "global_generator", None)


def restore(state: dict[str, Any]) -> None:
    """Puts back the three states `capture` returned.

    Raises:
        ValueError: `state` is not what `capture` returns, or the `tf.random`
            global generator uses another algorithm than the one recorded.

    Example:

    >>> state = capture()
    >>> first = random.random()
    >>> restore(state)
    >>> random.random() == first
    True
    """
    import tensorflow as tf

    try:
        version, internal, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        recorded = state["tensorflow"]
        generator = None if recorded is None else tf.random.get_global_generator()
        if generator is not None and int(generator.algorithm) != recorded["algorithm"]:
            raise ValueError(
                f"the tf.random global generator uses algorithm {int(generator.algorithm)}, "
                f"the recorded state algorithm {recorded['algorithm']}. Fix: create the global "
                "generator with the algorithm of the run that was backed up.")
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if generator is not None:
            generator.reset(np.asarray(recorded["state"],
                                       dtype=generator.state.dtype.as_numpy_dtype))
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a recorded random state ({type(e).__name__}: {e}). Fix: pass "
                         "what disttrain.resume.input_state.capture() returned.") from e


def settle(collect: bool = True, poll_s: float = 0.01, quiet_polls: int = 3,
            limit_s: float = 1.0) -> None:
    """Waits until no dropped input iterator still draws random numbers: collects
    unreachable iterators (their threads stop; `collect`), then waits until NumPy's and
    Python's states stayed unchanged for `quiet_polls` polls (at most `limit_s`), so a
    draw still in flight does not land after the state is recorded or restored."""
    if collect:
        gc.collect()
    deadline = time.monotonic() + limit_s
    last, quiet = None, 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        now = (np.random.get_state()[2], np.random.get_state()[1][0], random.getstate()[1][-1])
        quiet = quiet + 1 if now == last else 0
        last = now
        time.sleep(poll_s)




class InputStream:
    """The record of where this process's training input stream started: the random
    state it started from, and the state a resume carries into it.

    One per process (`disttrain.resume.current().stream`), because Keras's symbolic
    build draws from a first input iterator before any callback of the `fit` runs;
    `begin_fit`/`end_fit` bound the part that belongs to one `fit`.

    Example:

    ```python
    stream = resume.current().stream
    stream.begin_fit()                  # BackupAndRestore.on_train_begin
    stream.carry(part["random_state"])  # resuming: restored when the stream starts
    ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start: dict[str, Any] | None = None
        self._carried: dict[str, Any] | None = None
        self._training: weakref.ref | None = None
        self._seen: weakref.ref | None = None
        self._seen_state: dict[str, Any] | None = None
        self._fit_open = False
        self._enabled = False

    def enable(self) -> None:
        """Turns recording on in this process (a `BackupAndRestore(random_state=True)` was
        made). Until then `stream_starts` returns at once: a process that backs up no random
        state pays nothing when it makes input iterators."""
        self._enabled = True

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Puts back, after the block, the random states it found (once `enable()`d), when
        the input iterators the block made and dropped no longer draw; a no-op otherwise.

        For reads of an input outside training (the input check's first element), whose
        prefetching would otherwise move the generators the training stream starts from
        by a varying number of draws.

        Example:

        ```python
        with resume.current().stream.kept():
            first = next(iter(dataset.take(1)))
        ```
        """
        if not self._enabled:
            yield
            return
        state = capture()
        try:
            yield
        finally:
            settle()
            restore(state)

    def begin_fit(self) -> None:
        """Forgets the previous `fit`'s stream: the next training iterator starts a new one."""
        with self._lock:
            self._start, self._carried, self._training, self._fit_open = None, None, None, True

    def end_fit(self) -> None:
        """Stops recording until the next `begin_fit` (a `fit` without BackupAndRestore
        records nothing)."""
        with self._lock:
            self._carried, self._training, self._fit_open = None, None, False

    def carry(self, state: dict[str, Any] | None) -> None:
        """Resuming: `state`, the first attempt's stream start, is restored when this
        `fit`'s training stream starts (and recorded as its start again)."""
        with self._lock:
            self._carried = state

    def stream_starts(self, epoch_iterator: object) -> None:
        """Called by the epoch iterator just before it makes a new input iterator.

        Once `enable()`d, records the random state the epoch iterator's first input
        iterator starts from, whether or not a `fit` with BackupAndRestore is running
        (Keras's symbolic build draws from a first iterator before any callback runs,
        then drops it). During such a `fit` (`begin_fit`), for the training epoch
        iterator (the first one to start a stream; validation makes its own later):
        resuming, the carried state is restored; a persistent iterator that is made
        again (its stream restarts from the beginning, e.g. after the symbolic
        build) restarts from the state its first iterator started from, so what the
        dropped iterator drew ahead does not shift the stream; otherwise the state
        is captured. The state used is recorded as the stream's start.
        """
        if not self._enabled:
            return
        persistent = bool(getattr(epoch_iterator, "_disttrain_persistent", False))
        with self._lock:
            if (self._fit_open and self._training is not None
                    and self._training() is not epoch_iterator):
                return
            first = self._seen is None or self._seen() is not epoch_iterator
            if not first and not self._fit_open:
                return
            if first:
                self._seen, self._seen_state = weakref.ref(epoch_iterator), None
            if self._fit_open and self._training is None:
                self._training = weakref.ref(epoch_iterator)
            fit_open, seen_state = self._fit_open, self._seen_state
            carried = self._carried if fit_open else None
            self._carried = None if fit_open else self._carried
        restart = fit_open and persistent and not first and seen_state is not None
        if carried is not None:
            state = carried
        elif restart:
            state = seen_state
        else:
            settle(collect=False)
            state = capture()
        if carried is not None or restart:
            settle()
            restore(state)
        with self._lock:
            if first or carried is not None:
                self._seen_state = state
            if fit_open:
                self._start = state

    def stream_start(self) -> dict[str, Any] | None:
        """The random state this `fit`'s training stream started from (None before it
        started)."""
        with self._lock:
            return self._start
