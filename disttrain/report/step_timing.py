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
installs `disttrain.keras_compat.step_timing_recorder`, which wraps Keras's
`CallbackList` hooks and rewrites that local JSON file at every epoch end.
Nothing is recorded without the variable. This module reads the files; importing
it imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import statistics
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
