"""Stop agreement: one exchange ends each epoch, and a stop asked anywhere ends `fit` everywhere.

Keras reads `model.stop_training` on each worker alone: a callback that stops
on one worker makes it leave `fit` while the others wait in the next collective.
After all callbacks' `on_epoch_end` ran, the workers make one exchange: whether
any of them wants to stop (every worker sets the result, so the callbacks'
order does not matter), together with what disttrain's deciding callbacks
deferred to it with `defer()` (ReduceLROnPlateau's learning rates,
EarlyStopping's decision), which each then settles from every worker's value.
So an epoch end costs one exchange however many deciding callbacks there are.
The same holds in custom training loops that drive callbacks through
`keras.callbacks.CallbackList(..., model=model)`, where `model.stop_training`
may never have been set (read as False). Per-batch votes (for callbacks that stop inside an epoch) run only when a
callback in the list has a true attribute `PER_BATCH_ATTRIBUTE`, as
`disttrain.callbacks.SyncStop(per_batch=True)` does. A no-op outside
multi-worker training.
See `docs/keras_compat.md#stop-agreement`.

Example, in a callback's `on_epoch_end`:

```python
def settle(per_worker):                # every worker's value, in rank order
    self.model.optimizer.learning_rate = per_worker[0]

if not stop_agreement.defer(self.model, "MyCallback-1.lr", lr, settle):
    settle(json.loads(...))            # no epoch-end exchange follows: exchange yourself
```
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

from disttrain.keras_compat import _patch, detection

NAME = "stop_agreement"

PER_BATCH_ATTRIBUTE = "agree_stop_per_batch"
"""A callback with this attribute true asks for a stop vote after every training batch."""

EPOCH_END = "keras_compat.stop_training.epoch"
"""The call site of the epoch-end exchange (`disttrain.coordination` names it in errors)."""



@dataclasses.dataclass
class _EpochEnd:
    """The values callbacks deferred to the exchange ending one epoch of one model."""

    model: Any
    deferred: dict[str, tuple[Any, Callable[[list[Any]], None]]] = dataclasses.field(
        default_factory=dict)


_epoch_ends: list[_EpochEnd] = []


def install() -> None:
    """Wraps `CallbackList.on_epoch_end` and `on_train_batch_end` (once per process)."""
    from keras.src.callbacks.callback_list import CallbackList  # private: keras.src

    _patch.wrap(CallbackList, "on_epoch_end", _agreeing_at_epoch_end, by=NAME)
    _patch.wrap(CallbackList, "on_train_batch_end", _agreeing_per_batch, by=NAME)


def _agreeing_at_epoch_end(epoch_end: Callable) -> Callable:
    @functools.wraps(epoch_end)
    def on_epoch_end(self, epoch, logs=None):
        model = getattr(self, "model", None)
        if model is None or not detection.is_multi_worker(model.distribute_strategy):
            epoch_end(self, epoch, logs)
            return
        end = _EpochEnd(model)
        _epoch_ends.append(end)
        try:
            epoch_end(self, epoch, logs)
        finally:
            _epoch_ends.remove(end)
        _agree_at_epoch_end(end)

    return on_epoch_end


def _agreeing_per_batch(batch_end: Callable) -> Callable:
    @functools.wraps(batch_end)
    def on_train_batch_end(self, batch, logs=None):
        batch_end(self, batch, logs)
        if any(getattr(c, PER_BATCH_ATTRIBUTE, False) for c in self.callbacks):
            _agree(self, "keras_compat.stop_training.batch")

    return on_train_batch_end


def stop_requested(model) -> bool:
    """Whether a callback asked `model` to stop: `model.stop_training`, which `fit` sets to
    False before training and a custom training loop may never set (then False)."""
    return bool(getattr(model, "stop_training", False))


def defer(model, key: str, value: Any, settle: Callable[[list[Any]], None]) -> bool:
    """Adds `value` to the one exchange that ends this epoch of `model`'s multi-worker `fit`.

    After every callback's `on_epoch_end` ran, each worker's `value` travels in
    the epoch's stop vote, and `settle` is called on every worker with the list
    of every worker's value (in rank order). Callbacks that would exchange at
    each epoch end anyway (a vote, a broadcast) defer instead, so an epoch end
    costs one exchange however many of them there are.

    Args:
        model: the model being trained (the callback's `self.model`).
        key: names the value; unique per callback instance, the same on every
            worker (e.g. `"EarlyStopping-1.stop"`).
        value: JSON-serializable.
        settle: called with every worker's value.

    Returns:
        False when no epoch-end exchange follows (called outside the epoch end of
        a multi-worker `fit`): `settle` will not be called, exchange by yourself.

    Raises:
        ValueError: `key` was already deferred in this epoch end.
        ChiefOnlyError: called from chief-only code (`disttrain.callbacks.on_chief`).
    """
    from disttrain.coordination import chief_only

    chief_only.refuse(f"the epoch-end agreement {key!r}")
    if not _epoch_ends or _epoch_ends[-1].model is not model:
        return False
    deferred = _epoch_ends[-1].deferred
    if key in deferred:
        raise ValueError(f"stop_agreement.defer: {key!r} was already deferred in this epoch end")
    deferred[key] = (value, settle)
    return True


def _agree_at_epoch_end(end: _EpochEnd) -> None:
    """The epoch's one exchange: the stop vote and every deferred value; then each
    deferred value is settled and, if any worker wants to stop, every worker stops."""
    from disttrain import coordination
    from disttrain.errors import CallbackConfigError

    mine = {"stop": stop_requested(end.model),
            "deferred": {key: value for key, (value, _) in end.deferred.items()}}
    reports = [json.loads(r) for r in coordination.get().gather(EPOCH_END, json.dumps(mine))]
    for rank, report in enumerate(reports):
        if set(report["deferred"]) != set(end.deferred):
            raise CallbackConfigError(
                f"disttrain callbacks differ between workers: at the end of the epoch worker "
                f"{rank} has {sorted(report['deferred'])}, worker {coordination.get().rank} has "
                f"{sorted(end.deferred)}. Fix: pass the same disttrain callbacks, in the same "
                "order, on every worker.")
    for key, (_, settle) in end.deferred.items():
        settle([report["deferred"][key] for report in reports])
    if any(report["stop"] for report in reports):
        end.model.stop_training = True


def _agree(callbacks, name: str) -> None:
    """One vote of every worker on `model.stop_training`; every worker sets the result."""
    model = getattr(callbacks, "model", None)
    if model is None or not detection.is_multi_worker(model.distribute_strategy):
        return
    from disttrain import coordination

    if coordination.get().any(stop_requested(model), name):
        model.stop_training = True
