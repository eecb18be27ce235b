"""Records this process's step timing for `disttrain.report.step_timing` (a registered patch).

Wraps Keras's `CallbackList` hooks around each training step and epoch, and
rewrites a local JSON file at every epoch end; `disttrain.report.step_timing` reads
and summarizes those files. `disttrain.strategy()` installs it when the
launcher set `DISTTRAIN_TIMING_FILE`.

Example:

```python
step_timing_recorder.install(os.environ[step_timing.ENV_TIMING_FILE])
```
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

from disttrain.keras_compat import _patch

NAME = "step_timing_recorder"


class _Recorder:
    def __init__(self, path: str):
        self.path = path
        self.epochs: list[dict[str, Any]] = []
        self._epoch_started = 0.0
        self._step_started: float | None = None
        self._step_ended: float | None = None
        self._steps: list[float] = []
        self._outside: list[float] = []

    def epoch_begins(self) -> None:
        self._epoch_started = time.monotonic()
        self._step_started = self._step_ended = None
        self._steps, self._outside = [], []

    def step_begins(self) -> None:
        now = time.monotonic()
        if self._step_ended is not None:
            self._outside.append(now - self._step_ended)
        self._step_started = now

    def step_ends(self) -> None:
        now = time.monotonic()
        if self._step_started is not None:
            self._steps.append(now - self._step_started)
        self._step_ended = now

    def epoch_ends(self, epoch: int) -> None:
        if not self._steps:
            return
        self.epochs.append({
            "epoch": epoch + 1, "seconds": round(time.monotonic() - self._epoch_started, 4),
            "steps": len(self._steps), "step_s": round(statistics.median(self._steps), 6),
            "outside_s": round(statistics.median(self._outside), 6) if self._outside else 0.0,
        })
        from disttrain import storage

        storage.write_json(self.path, {"epochs": self.epochs})


def install(path: str) -> None:
    """Records this process's training steps into `path` (the first call decides).

    Args:
        path: a local JSON file, rewritten at every epoch end.
    """
    from keras.src.callbacks.callback_list import CallbackList  # private: keras.src

    recorder = _Recorder(path)
    for attr, place, hook in (
            ("on_epoch_begin", _before, lambda *_: recorder.epoch_begins()),
            ("on_train_batch_begin", _after, lambda *_: recorder.step_begins()),
            ("on_train_batch_end", _before, lambda *_: recorder.step_ends()),
            ("on_epoch_end", _after, lambda epoch, *_: recorder.epoch_ends(epoch))):
        _patch.wrap(CallbackList, attr, functools.partial(place, hook=hook), by=NAME)


def _before(method, *, hook):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook(*args)
        return method(self, *args, **kwargs)

    return wrapper


def _after(method, *, hook):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        hook(*args)
        return result

    return wrapper
