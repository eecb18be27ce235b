"""Per-worker step timing for a launcher's summary, and the straggler it points to.

Under MultiWorkerMirroredStrategy every training step ends with an all-reduce,
so all workers leave a step together and the step itself takes the same time
on each. What differs is each worker's own time *between* steps (callbacks,
Python work, anything done on one worker only): a worker that spends longer
there starts its next step late, and every other worker waits for it inside the
step. So for each worker this records, per epoch, the median time in the
synchronous step (the train-function call), the median time outside it (from
one step's end to the next step's start) and the epoch's wall time; a launcher
names as straggler the worker whose outside time is persistently the longest
(`stragglers`). A worker slow *inside* the step (a slower device, an input
pipeline read inside the step) makes every worker's step longer alike: these
numbers show the step grew but cannot name who caused it.

The launcher sets `DISTTRAIN_TIMING_FILE` per task; `disttrain.strategy()` then
calls `install`, which wraps Keras's `CallbackList` hooks and rewrites that
local JSON file at every epoch end. Nothing is recorded without the variable.
Importing this module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import functools
import json
import statistics
import threading
import time
from collections.abc import Mapping
from typing import Any

ENV_TIMING_FILE = "DISTTRAIN_TIMING_FILE"
"""Set by launchers: a local path where this task writes its step timing (JSON)."""

STRAGGLER_SHARE = 0.75
"""A straggler has the longest outside time in at least this share of the epochs."""
STRAGGLER_MIN_S = 0.005
"""...and its median outside time exceeds every other worker's by at least this much,"""
STRAGGLER_MIN_FRACTION = 0.1
"""...and by at least this fraction of the median step cycle (step + outside)."""

_lock = threading.Lock()
_installed = False


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
    """Records this process's training steps into `path` (once per process).

    Example:

    ```python
    step_timing.install(os.environ[step_timing.ENV_TIMING_FILE])
    ```
    """
    global _installed
    with _lock:
        if _installed:
            return
        from keras.src.callbacks.callback_list import CallbackList

        recorder = _Recorder(path)
        CallbackList.on_epoch_begin = _before(CallbackList.on_epoch_begin,
                                              lambda *_: recorder.epoch_begins())
        CallbackList.on_train_batch_begin = _after(CallbackList.on_train_batch_begin,
                                                   lambda *_: recorder.step_begins())
        CallbackList.on_train_batch_end = _before(CallbackList.on_train_batch_end,
                                                  lambda *_: recorder.step_ends())
        CallbackList.on_epoch_end = _after(CallbackList.on_epoch_end,
                                           lambda epoch, *_: recorder.epoch_ends(epoch))
        _installed = True


def _before(method, hook):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook(*args)
        return method(self, *args, **kwargs)

    return wrapper


def _after(method, hook):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        hook(*args)
        return result

    return wrapper


def read(path: str) -> list[dict[str, Any]]:
    """The epochs a task recorded in `path`; [] when it wrote none (or a partial file)."""
    try:
        with open(path) as f:
            return list(json.load(f)["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def stragglers(timings: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """The label of the worker the others persistently wait for, or None.

    Args:
        timings: task label → its recorded epochs (`read`), two tasks or more.
    """
    labels = [label for label, epochs in timings.items() if epochs]
    if len(labels) < 2:
        return None
    by_epoch: dict[int, dict[str, float]] = {}
    for label in labels:
        for e in timings[label]:
            by_epoch.setdefault(e["epoch"], {})[label] = e["outside_s"]
    common = [outside for outside in by_epoch.values() if len(outside) == len(labels)]
    if not common:
        return None
    slowest = [max(outside, key=outside.__getitem__) for outside in common]
    candidate = max(set(slowest), key=slowest.count)
    if slowest.count(candidate) < STRAGGLER_SHARE * len(common):
        return None
    median = {label: _median(timings[label], "outside_s") for label in labels}
    cycle = statistics.median(_median(timings[label], "step_s") + median[label]
                              for label in labels)
    margin = median[candidate] - max(v for k, v in median.items() if k != candidate)
    return candidate if margin >= max(STRAGGLER_MIN_S, STRAGGLER_MIN_FRACTION * cycle) else None


def _median(epochs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(e[key] for e in epochs)


def summary_lines(timings: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """The launcher's timing table: per task the median step, the median time outside
    the step, the slowest epoch; then the straggler, if any."""
    recorded = {label: epochs for label, epochs in timings.items() if epochs}
    if not recorded:
        return []
    lines = ["  timing     step      outside   slowest epoch"]
    for label, epochs in recorded.items():
        slow = max(epochs, key=lambda e: e["seconds"])
        lines.append(f"  {label:<10} {_ms(_median(epochs, 'step_s')):<9} "
                     f"{_ms(_median(epochs, 'outside_s')):<9} "
                     f"{slow['epoch']} ({slow['seconds']:.1f}s)")
    lines.append("  (medians per step: the synchronous step, and the task's own time between "
                 "steps)")
    straggler = stragglers(recorded)
    if straggler is not None:
        others = max(_median(e, "outside_s") for k, e in recorded.items() if k != straggler)
        lines.append(
            f"  straggler: {straggler} spends {_ms(_median(recorded[straggler], 'outside_s'))} "
            f"per step between steps (the others at most {_ms(others)}), and every step waits "
            f"for it: look at what {straggler} alone does between steps (callbacks, logging, "
            "Python work on one worker)")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"
