"""Preemption: a SIGTERM on any worker stops every worker at one agreed training step.

Kubernetes (and `launch.local`) stop a worker with SIGTERM and kill it a grace
period later. Stopping only the signalled worker would leave its peers blocked
in the next collective; stopping each worker wherever it happens to be would
save nothing consistent. `PreemptionWatch` turns the signal into an agreement:

1. The signalled worker posts the request through `coordination` from a short
   thread (the first post wins if several workers are signalled).
2. A background thread on every worker waits for that post. When it arrives,
   the worker acknowledges with the number of training steps it has completed.
3. The chief's thread collects every acknowledgement and posts the agreed stop
   step: the largest acknowledged step plus one (or, when a peer was lost, the
   error naming it). Collectives keep the workers within a step of each other,
   and a worker that has acknowledged waits for the decision at its next step
   end, so no worker has passed that step and every worker reaches it.

A non-chief worker makes one write and two reads per preemption, whatever the
size of the cluster; only the chief reads every acknowledgement.

The training loop calls `step_done(n)` after each step; it returns True at the
agreed step on every worker. `BackupAndRestore` then saves a backup there and
raises `disttrain.errors.Preempted`, which exits the process with
`PREEMPTED_EXIT_CODE` (75).

Example:

```python
watch = PreemptionWatch(coordination.get()).start()
...
if watch.step_done(steps):
    save(); raise Preempted("...")
watch.stop()
```
"""

from __future__ import annotations

import json
import signal
import threading
import warnings
import weakref

from disttrain.coordination import Coordinator
from disttrain.errors import CoordinationError

_REQUEST = "preemption/request"
_ACK = "preemption/ack"
_DECISION = "preemption/stop_step"
_POLL_S = 0.5
# The watch of the running `fit`, per coordinator (one per process, but for ranks
# simulated in threads). A `fit` that raised never stopped its watch (Keras skips
# `on_train_end` then); the next watch stops it, so that a stale one never
# acknowledges a later request with an old step count.
_current: weakref.WeakKeyDictionary[Coordinator, PreemptionWatch] = weakref.WeakKeyDictionary()


class PreemptionWatch:
    """Watches for SIGTERM on this worker and for preemption requests of its peers.

    Args:
        coordinator: the process's coordinator (`coordination.get()`).
        signum: the signal that means "preempted"; SIGTERM.
    """

    def __init__(self, coordinator: Coordinator, signum: int = signal.SIGTERM):
        self._coord = coordinator
        self._signum = signum
        self._lock = threading.Lock()
        self._local = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_handler = None
        self._completed = 0
        self._seen = False
        self._stop_step: int | None = None
        self.requested_by: str | None = None

    def start(self) -> PreemptionWatch:
        """Installs the signal handler (main thread only) and starts the watcher thread,
        after stopping a watch this process left running."""
        stale = _current.get(self._coord)
        if stale is not None:
            stale.stop()
        _current[self._coord] = self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "disttrain: fit() runs outside the main thread, where Python cannot install "
                f"a {signal.Signals(self._signum).name} handler, so a preemption will kill "
                "this worker without a backup. Run fit() in the main thread to save one.",
                stacklevel=2,
            )
        else:
            self._previous_handler = signal.signal(self._signum, self._on_signal)
        if self._coord.num_workers == 1:
            return self
        self._thread = threading.Thread(target=self._watch, name="disttrain-preemption",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Restores the previous signal handler and ends the watcher thread.

        A request that arrived after this worker's last step but before its peers'
        is still acknowledged (and on the chief decided), so a peer that saw it in
        time gets its answer and, with the stop step past the end of training,
        finishes normally too.
        """
        if _current.get(self._coord) is self:
            del _current[self._coord]
        if self._previous_handler is not None:
            signal.signal(self._signum, self._previous_handler)
            self._previous_handler = None
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                if not self._seen and self._coord.poll(_REQUEST) is not None:
                    self._acknowledge()
                    self._decide()
            except CoordinationError:
                return

    def step_done(self, completed: int) -> bool:
        """Records that `completed` training steps are done; True when it is time to stop.

        Called by every worker after every training step with the same sequence of
        numbers; returns True at the same step on every worker.
        """
        if self._coord.num_workers == 1:
            if self._local.is_set():
                self.requested_by = "this process"
            return self._local.is_set()
        with self._lock:
            self._completed = completed
            seen = self._seen
        if not seen:
            return False
        if self._stop_step is None:
            decision = json.loads(self._coord.wait_for_post(_DECISION))
            if "error" in decision:
                raise CoordinationError(decision["error"])
            self._stop_step = decision["step"]
        return completed >= self._stop_step

    def _on_signal(self, signum, frame) -> None:
        if self._local.is_set():
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self._local.set()
        if self._coord.num_workers > 1:
            threading.Thread(target=self._post_request, name="disttrain-preemption-post",
                             daemon=True).start()

    def _post_request(self) -> None:
        try:
            self._coord.post(_REQUEST, self._coord.cluster.label_of_rank(self._coord.rank))
        except CoordinationError:
            return

    def _watch(self) -> None:
        try:
            self._watch_until_requested()
        except CoordinationError:
            return

    def _watch_until_requested(self) -> None:
        while not self._closing.is_set():
            requester = self._coord.poll(_REQUEST, wait=_POLL_S)
            if requester is None:
                continue
            self.requested_by = requester
            self._acknowledge()
            self._decide()
            return

    def _acknowledge(self) -> None:
        with self._lock:
            self._seen = True
            completed = self._completed
        self._coord.post(f"{_ACK}/{self._coord.rank}", str(completed))

    def _decide(self) -> None:
        """On the chief: posts the stop step agreed from every acknowledgement, or the
        error that prevented it, for every worker to read at its next step end.

        When this worker stops watching (its training ended) before every peer
        acknowledged, the missing peers have finished their steps too; the stop
        step is then past everyone's last step, and training ends normally.
        """
        if self._coord.rank != 0:
            return
        try:
            acks = self._coord.collect(_ACK, cancel=self._closing)
        except CoordinationError as e:
            self._coord.post(_DECISION, json.dumps({"error": str(e)}))
            raise
        with self._lock:
            completed = self._completed
        known = [int(a) for a in acks if a is not None]
        if None in acks:
            known.append(completed)
        self._coord.post(_DECISION, json.dumps({"step": max(known) + 1}))
