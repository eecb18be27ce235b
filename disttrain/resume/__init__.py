"""Resuming a run: the state a backup carries into the next attempt, and the preemption watch.

- `input_state`: the random state a worker's training input stream starts from
  (`capture`/`restore`, and `InputStream`, the record of one process's stream).
- `skip_request`: how many batches the resumed epoch passes over (`SkipRequest`).
- `preemption`: a SIGTERM on any worker stops every worker at one agreed step
  (`PreemptionWatch`).

The state that crosses `BackupAndRestore` and the epoch iterator's wrapper lives in
one `ResumeState` per process (`current()`); docs/architecture.md#how-resume-state-flows
draws the flow.

Example:

```python
from disttrain import resume

resume.current().stream.begin_fit()    # BackupAndRestore.on_train_begin
resume.current().skip.ask(120, passes=1)  # the resumed epoch's on_epoch_begin
```
"""

from __future__ import annotations

import dataclasses

from disttrain.resume.input_state import InputStream
from disttrain.resume.skip_request import SkipRequest


@dataclasses.dataclass(frozen=True)
class ResumeState:
    """What one process's resume hands between `BackupAndRestore` and the epoch
    iterator's wrapper: the input stream's record and the pending skip request.

    It lives as long as the process (Keras's symbolic build starts an input stream
    before any callback of a `fit` runs); each `fit` with `BackupAndRestore` opens and
    closes its part (`stream.begin_fit()`/`end_fit()`, `skip.cancel()`).
    """

    stream: InputStream = dataclasses.field(default_factory=InputStream)
    skip: SkipRequest = dataclasses.field(default_factory=SkipRequest)


_PROCESS = ResumeState()


def current() -> ResumeState:
    """This process's `ResumeState`.

    Example:

    >>> current() is current()
    True
    """
    return _PROCESS


__all__ = ["InputStream", "ResumeState", "SkipRequest", "current"]
