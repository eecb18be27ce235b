"""The skip request: how many batches the next training epoch passes over, resuming mid-epoch.

`BackupAndRestore` makes the request at the resumed epoch's `on_epoch_begin`
(through `keras_compat.persistent_epoch_iterator.skip_batches_of_next_epoch`,
which installs the epoch iterator's wrapper); the wrapper takes it when it
enumerates that epoch; `on_train_end` cancels one no epoch consumed.

Example:

>>> request = SkipRequest()
>>> request.ask(120, passes=1)
>>> request.take()
(120, 1)
>>> request.take()
(0, 0)
"""

from __future__ import annotations

import threading


class SkipRequest:
    """At most one pending request: `batches` batches into the epoch, after `passes`
    whole passes over the input. One per process (`disttrain.resume.current().skip`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = 0
        self._passes = 0

    def ask(self, batches: int, passes: int = 0) -> None:
        """Asks the next epoch enumerated to pass over `batches` batches (`passes` whole
        passes in); replaces a request not yet taken.

        Raises:
            ValueError: `batches` or `passes` is negative.
        """
        if batches < 0 or passes < 0:
            raise ValueError(f"batches={batches}, passes={passes} must be >= 0. Fix: pass the "
                             "number of batches of the epoch and of epochs already trained.")
        with self._lock:
            self._batches, self._passes = batches, passes

    def cancel(self) -> None:
        """Drops a request no epoch has consumed (e.g. `fit` ended first)."""
        with self._lock:
            self._batches = self._passes = 0

    def take(self) -> tuple[int, int]:
        """`(batches, passes)` of the pending request, `(0, 0)` for none; the request is
        consumed."""
        with self._lock:
            request = self._batches, self._passes
            self._batches = self._passes = 0
        return request
