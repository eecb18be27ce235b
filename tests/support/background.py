"""Slow set-up that waits on the network, started when the session starts (tests/conftest.py).

The container test's image build and the older TF×Keras pair's venv spend minutes downloading;
started at collection in a thread, they overlap the CPU-bound tests that run before them.

Example:

```
job = Background(lambda: matrix.install(matrix.VENVS, pair))
...                                   # other tests run
python = job.result(timeout=900)      # the value, or what the set-up raised
```
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """Runs `target()` in a daemon thread from now on."""

    def __init__(self, target: Callable[[], T]) -> None:
        self._target = target
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-setup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._target()
        except BaseException as e:  # handed to the test that waits, not lost in the thread
            self._error = e

    def result(self, timeout: float) -> T:
        """Waits for `target()`; returns its value or raises what it raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the background set-up took over {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self._value
