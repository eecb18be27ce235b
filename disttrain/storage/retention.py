"""Retention: which checkpoints of a directory are kept, one policy for every checkpoint kind.

A `Retention` keeps a checkpoint when any of its rules keeps it (the union, as
Orbax's preservation policies combine):

- `latest=k`: the k newest;
- `best=k`: the k best by their monitored `value` (the manager's `mode`);
- `every_epochs=n`: those taken at the end of every n-th epoch (epoch 5, 10...
  for n=5);
- `every_steps=n`: the first taken at or after every n-th training step (the
  optimizer's `iterations`);
- `every_hours=h`: the first, then each taken at least h hours after the last
  one this rule kept.

With no rule at all every checkpoint is kept. `max_to_keep=k` of
`ModelCheckpoint` and `BackupAndRestore` is the simple case
(`Retention(latest=k)`, or `Retention(best=k)` for `save_best_only`). Rules
read these record fields: `value` (best), `epoch` and `batch`/`batches`
(every_epochs: a record with a nonzero batch count was taken inside an epoch),
`iterations` (every_steps) and `time` (every_hours, seconds since the epoch).
A record without the field a rule reads is not kept by that rule. Each rule
is stable: a record a rule keeps stays kept as later records arrive.

Example:

>>> policy = Retention(best=1, every_epochs=2)
>>> records = [{"path": f"m-{e}", "epoch": e, "value": v}
...            for e, v in [(1, 0.5), (2, 0.6), (3, 0.4), (4, 0.7)]]
>>> [r["path"] for r in policy.keep(records, mode="min")]
['m-2', 'm-3', 'm-4']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from disttrain.errors import StorageConfigError

_HOUR = 3600.0


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which checkpoints a `storage.CheckpointManager` keeps (see the module docstring).

    Args:
        latest: keep the newest this many.
        best: keep the best this many by the monitored value.
        every_epochs: also keep those taken at the end of every n-th epoch.
        every_steps: also keep the first taken at or after every n-th training step.
        every_hours: also keep one at least this many hours apart.

    Raises:
        StorageConfigError: a count that is not a positive integer, or hours that
            are not a positive number.

    Example:

    ```python
    keep = disttrain.storage.Retention(best=3, every_epochs=10)
    disttrain.callbacks.ModelCheckpoint("gs://b/{run_id}/m-{epoch}.keras", retention=keep)
    ```
    """

    latest: int | None = None
    best: int | None = None
    every_epochs: int | None = None
    every_steps: int | None = None
    every_hours: float | None = None

    def __post_init__(self):
        for name in ("latest", "best", "every_epochs", "every_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise StorageConfigError(
                    f"Retention({name}={value!r}): must be a positive integer or None. "
                    f"Fix: pass e.g. {name}=3."
                )
        hours = self.every_hours
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                                  or not hours > 0):
            raise StorageConfigError(
                f"Retention(every_hours={hours!r}): must be a positive number of hours or "
                "None. Fix: pass e.g. every_hours=6."
            )

    @property
    def keeps_all(self) -> bool:
        """Whether no rule is set (every checkpoint is kept)."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def keep(self, records: list[dict[str, Any]], mode: str | None = None
             ) -> list[dict[str, Any]]:
        """The records (oldest first) this policy keeps, in their order.

        Args:
            records: checkpoint records, oldest first.
            mode: `"min"` or `"max"`: which `value` is best (None ranks as `"min"`).
        """
        if self.keeps_all:
            return list(records)
        kept: set[int] = set()
        if self.latest is not None:
            kept.update(range(max(0, len(records) - self.latest), len(records)))
        if self.best is not None:
            sign = 1.0 if mode == "max" else -1.0
            ranked = sorted(range(len(records)), reverse=True, key=lambda i: (
                records[i].get("value") is not None, sign * (records[i].get("value") or 0.0)))
            kept.update(ranked[: self.best])
        if self.every_epochs is not None:
            kept.update(i for i, r in enumerate(records)
                        if r.get("epoch") and not (r.get("batch") or r.get("batches"))
                        and r["epoch"] % self.every_epochs == 0)
        if self.every_steps is not None:
            kept.update(_first_per_interval(records, "iterations", self.every_steps))
        if self.every_hours is not None:
            kept.update(_spaced(records, "time", self.every_hours * _HOUR))
        return [r for i, r in enumerate(records) if i in kept]


def _first_per_interval(records: list[dict[str, Any]], key: str, every: int) -> list[int]:
    """Indexes of the first record reaching each multiple of `every` (1x, 2x...) in `key`."""
    seen: set[int] = set()
    found = []
    for i, record in enumerate(records):
        value = record.get(key)
        if value is None or value < every or value // every in seen:
            continue
        seen.add(value // every)
        found.append(i)
    return found


def _spaced(records: list[dict[str, Any]], key: str, gap: float) -> list[int]:
    """Indexes of the first record with `key`, then of each at least `gap` after the last."""
    found: list[int] = []
    last = None
    for i, record in enumerate(records):
        value = record.get(key)
        if value is not None and (last is None or value - last >= gap):
            found.append(i)
            last = value
    return found
