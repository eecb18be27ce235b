"""A transport in this process's memory: one worker, or several simulated in threads."""

from __future__ import annotations

import threading
import time

from disttrain.coordination.transport import Transport
from disttrain.errors import CoordinationError


class InProcessTransport(Transport):
    """A key-value store in memory, shared by the threads that hold it.

    A single-worker process uses it with `num_workers=1`: every exchange is
    answered at once from its own value, without TensorFlow. Tests share one
    instance between several coordinators in threads, one per simulated rank,
    to run the multi-worker protocol without starting a cluster. Its workers
    cannot die apart from each other, so `check_peer` always finds them alive.

    Args:
        num_workers: how many workers (threads) share the store.

    Example:

    ```python
    shared = InProcessTransport(num_workers=2)
    coordinators = [Coordinator(cluster_of_rank(r), transport=shared) for r in (0, 1)]
    ```
    """

    def __init__(self, num_workers: int = 1):
        if num_workers < 1:
            raise CoordinationError(
                f"InProcessTransport(num_workers={num_workers!r}): a group needs at least one "
                "worker. Fix: pass the number of workers that share the store, e.g. 1.")
        self.num_workers = num_workers
        self._values: dict[str, str] = {}
        self._changed = threading.Condition()

    def set(self, key: str, value: str) -> bool:
        with self._changed:
            if key in self._values:
                return False
            self._values[key] = value
            self._changed.notify_all()
            return True

    def get(self, key: str, wait: float) -> str | None:
        deadline = time.monotonic() + wait
        with self._changed:
            while key not in self._values:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self._values[key]

    def delete(self, key: str) -> None:
        with self._changed:
            below = key + "/"
            for stored in [k for k in self._values if k == key or k.startswith(below)]:
                del self._values[stored]

    def check_peer(self, rank: int, wait: float) -> None:
        """Returns at once: threads of one process cannot be lost apart from it."""
