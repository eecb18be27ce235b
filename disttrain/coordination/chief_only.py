"""Chief-only sections: code that runs on the chief alone must not start an agreement.

An agreement (`Coordinator.gather` and everything built on it) is a step every
worker takes together; started from code that only the chief runs (a chief-only
callback, `disttrain.callbacks.on_chief`) the other workers never join it, and
the chief would wait for them until the timeout. Inside `section(...)` such a
call raises `ChiefOnlyError` at once instead, naming the section and the call.

Example:

```python
with chief_only.section("on_chief(SlackAlert).on_epoch_end"):
    alert.on_epoch_end(epoch, logs)      # coordination.get().any(...) in there raises
```
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from disttrain.errors import ChiefOnlyError

_state = threading.local()


@contextlib.contextmanager
def section(what: str) -> Iterator[None]:
    """Marks the calling thread as running chief-only code named `what` (nests)."""
    outer = getattr(_state, "what", None)
    _state.what = what
    try:
        yield
    finally:
        _state.what = outer


def current() -> str | None:
    """The name of the chief-only section this thread is in, or None."""
    return getattr(_state, "what", None)


def refuse(call: str) -> None:
    """Raises `ChiefOnlyError` when called inside a chief-only section.

    Args:
        call: what was called, for the message (e.g. `"agreement 'EarlyStopping-1.stop'"`).
    """
    what = current()
    if what is not None:
        raise ChiefOnlyError(
            f"{what} runs on the chief only, but called {call}, which every worker must "
            "call together: the other workers never would, so it would hang. Fix: move that "
            "call out of the chief-only code (run it on every worker, e.g. in an unwrapped "
            "callback, and pass its result in), or reduce across workers before the "
            "chief-only part.")
