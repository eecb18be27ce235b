"""Liveness: a worker that is alive but stuck is named, and the whole job fails.

TensorFlow's coordination service notices a peer that died or froze (no
heartbeats) within seconds and aborts every collective with an error naming
it. A peer that is alive but stuck - a deadlock or an endless loop in a
callback, a data-loading thread, user code run on one worker only - keeps
heartbeating, so its peers wait in their next collective forever.

`StallWatch` runs a thread on every worker of a multi-worker cluster. Every few
seconds it looks at where the main thread is (its innermost Python frame) and
publishes that through `coordination`: inside TensorFlow (a step, a
collective), inside a disttrain exchange, or elsewhere (local Python code).
When a worker has been elsewhere for `timeout` seconds while a peer waited
inside TensorFlow all that time, it is stuck:

- the stuck worker prints where it is and its Python stacks, and exits with
  `STALLED_EXIT_CODE` (70), so a launcher or Kubernetes sees a failed task
  instead of a silent one; its peers' collectives then fail within seconds
  (TensorFlow's heartbeat), naming its task;
- if it is still there a few looks later (its watch thread cannot run, e.g.
  it holds the GIL), the waiting workers abort their collectives with an error
  naming it and the line it is stuck on.

Each look costs a worker two calls (replacing its status line). Only the chief
reads every worker's status, and only while its own state has lasted nearly
the bound (a stall anywhere soon holds the chief in a collective too); it
republishes what it read inside its own status, so every other worker learns
every status, the chief's included, from one read of the chief's line.

The bound is `DISTTRAIN_COORDINATION_TIMEOUT` (default 1800 s), the same one
disttrain's own exchanges use: how long a worker waits for a live peer. A
worker waiting in a disttrain exchange (e.g. while the chief writes a large
checkpoint) is not counted as stuck; those exchanges have their own timeout.

Example (`disttrain.strategy()` starts it for you):

```python
StallWatch(coordination.get()).start()
```
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
import traceback

from disttrain.coordination.coordinator import Coordinator
from disttrain.errors import STALLED_EXIT_CODE, CoordinationError

IN_TENSORFLOW = "tensorflow"
IN_EXCHANGE = "exchange"
ELSEWHERE = "elsewhere"
_TF_FRAMES = os.sep + os.path.join("tensorflow", "python") + os.sep


def where(frame, in_exchange: bool = False) -> tuple[str, str]:
    """Classifies a thread by its innermost frame: (state, "file:line in function").

    Args:
        frame: the thread's innermost frame.
        in_exchange: whether the thread waits for a peer in a disttrain exchange
            (`Coordinator.is_waiting`); counts where the frame is not TensorFlow's.
    """
    place = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
    if _TF_FRAMES in frame.f_code.co_filename:
        return IN_TENSORFLOW, place
    return (IN_EXCHANGE if in_exchange else ELSEWHERE), place


class StallWatch:
    """Finds a live peer that stopped taking part in training; fails the job, naming it.

    Args:
        coordinator: the process's coordinator (`coordination.get()`); its
            `timeout` is the stall bound.
        interval: seconds between looks; default `min(5, timeout / 4)`.
    """

    def __init__(self, coordinator: Coordinator, interval: float | None = None):
        self._coord = coordinator
        self.timeout = coordinator.timeout
        self.interval = interval if interval is not None else min(5.0, self.timeout / 4)
        self._main = threading.main_thread()
        self._state: tuple[str, str] | None = None
        self._since = time.monotonic()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._posts = 0
        self._heard: dict[int, tuple[int, float]] = {}

    def start(self) -> StallWatch:
        if self._coord.num_workers > 1:
            self._thread = threading.Thread(target=self._run, name="disttrain-stall-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        try:
            while not self._closing.wait(self.interval):
                self._look()
        except CoordinationError:
            return

    def _look(self) -> None:
        frame = sys._current_frames().get(self._main.ident)
        if frame is None:
            return
        now = time.monotonic()
        state, place = where(frame, self._coord.is_waiting(self._main))
        if self._state is None or state != self._state[0]:
            self._since = now
        self._state = (state, place)
        waited = now - self._since
        self._posts += 1
        mine = {"state": state, "where": place, "for": waited, "post": self._posts}
        statuses = None
        if self._coord.rank == 0 and waited >= self.timeout - 3 * self.interval:
            statuses = self._peer_statuses(now)
            statuses[0] = dict(mine)
            mine["peers"] = statuses
        self._coord.set_status(json.dumps(mine))
        stuck_here = state == ELSEWHERE and waited >= self.timeout
        waiting = state == IN_TENSORFLOW and waited >= self.timeout + 3 * self.interval
        if not (stuck_here or waiting):
            return
        statuses = statuses if statuses is not None else self._statuses_from_chief(now)
        if stuck_here and self._peers_waiting_on_me(statuses):
            self._exit_stuck(place, waited)
        if waiting:
            stuck = self._stuck_peers(statuses)
            if stuck:
                self._abort(stuck, waited)

    def _fresh(self, rank: int, status: dict | None, now: float) -> dict | None:
        """`status`, or None once its post number stopped changing (its watch stopped)."""
        if status is None:
            return None
        post, heard = self._heard.get(rank, (-1, now))
        if status["post"] != post:
            self._heard[rank] = (status["post"], now)
        elif now - heard > 3 * self.interval:
            return None
        return status

    def _peer_statuses(self, now: float) -> list[dict | None]:
        """On the chief: every worker's status, read from each (N - 1 reads)."""
        return [None] + [self._fresh(rank, _parsed(self._coord.poll(f"status/{rank}")), now)
                         for rank in range(1, self._coord.num_workers)]

    def _statuses_from_chief(self, now: float) -> list[dict | None]:
        """On another worker: every status as the chief last published it (one read);
        the chief's own is always there, its peers' while the chief reads them."""
        statuses: list[dict | None] = [None] * self._coord.num_workers
        chief = self._fresh(0, _parsed(self._coord.poll("status/0")), now)
        if chief is not None:
            statuses = list(chief.pop("peers", statuses))
            statuses[0] = chief
        return statuses

    def _stuck_peers(self, statuses: list[dict | None]) -> list[tuple[int, dict]]:
        return [(rank, s) for rank, s in enumerate(statuses)
                if rank != self._coord.rank and s is not None
                and s["state"] == ELSEWHERE and s["for"] >= self.timeout - 2 * self.interval]

    def _peers_waiting_on_me(self, statuses: list[dict | None]) -> bool:
        return any(s is not None and s["state"] == IN_TENSORFLOW
                   and s["for"] >= self.timeout - 2 * self.interval
                   for rank, s in enumerate(statuses) if rank != self._coord.rank)

    def _abort(self, stuck: list[tuple[int, dict]], waited: float) -> None:
        from tensorflow.python.eager import context  # private: tensorflow.python
        from tensorflow.python.framework import errors  # private: tensorflow.python

        label = self._coord.cluster.label_of_rank
        names = "; ".join(f"{label(rank)} has been at {s['where']} for {s['for']:.0f}s"
                          for rank, s in stuck)
        message = (
            f"disttrain: {label(self._coord.rank)} waited {waited:.0f}s in a training step for "
            f"peers that are alive but stuck outside training: {names}. Fix: see that "
            "worker's log (it prints its stacks and exits); raise "
            "DISTTRAIN_COORDINATION_TIMEOUT if that work is legitimately this slow."
        )
        print(message, file=sys.stderr, flush=True)
        context.context().abort_collective_ops(errors.UNAVAILABLE, message)
        self._closing.set()

    def _exit_stuck(self, place: str, waited: float) -> None:
        me = self._coord.cluster.label_of_rank(self._coord.rank)
        message = (f"disttrain: {me} has been at {place} for {waited:.0f}s while its peers "
                   f"wait for it in a training step; exiting with {STALLED_EXIT_CODE}.")
        print(message + " Python stacks of all threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        frame = sys._current_frames().get(self._main.ident)
        if frame is not None:
            print("Main thread, most recent call last:\n"
                  + "".join(traceback.format_stack(frame)) + message,
                  file=sys.stderr, flush=True)
        os._exit(STALLED_EXIT_CODE)


def _parsed(raw: str | None) -> dict | None:
    return None if raw is None else json.loads(raw)
