"""The one hook on `fit`, `evaluate` and `predict` that runs the checks before a call starts.

Two checks, each skippable on its own, run in this order at the start of every
call under multi-worker training (not fixes of Keras code):

- `preflight`: configuration mistakes (batch, steps, sharding, dtype, threads);
- `input_check`: every worker's input is the same (tf.data sharded by element,
  arrays, `PyDataset`s, generators), and Keras's shuffle of arrays draws one order
  on every worker (`input_order`); a generator's or `PyDataset`'s later batches are
  compared at each epoch's end (`later_batches`).

In a process of `python -m disttrain.check parity` it also adds the parity probe's
capturing callback to `fit` (`parity_probe`).

`keras_compat.apply()` installs the hook after the fixes, with the checks it was
not asked to skip (`apply(skip=("preflight",))`, `apply(skip=("input_check",))`);
each check also has its own environment switch (`DISTTRAIN_PREFLIGHT=0`,
`DISTTRAIN_INPUT_CHECK=0`). See `docs/keras_compat.md#preflight` and
`docs/keras_compat.md#input-check`.

Example:

```python
disttrain.keras_compat.apply(skip=("input_check",))   # the preflight still runs
```
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from disttrain.keras_compat import (
    _patch,
    detection,
    input_check,
    input_order,
    later_batches,
    parity_probe,
    preflight,
)

NAME = "call_checks"
CHECKS = (preflight.NAME, input_check.NAME)
"""The checks the hook runs, in order."""

# The arguments of each checked method that may hold an input.
_CHECKED_ARGUMENTS = {"fit": ("x", "y", "sample_weight", "validation_data"),
                      "evaluate": ("x", "y", "sample_weight"), "predict": ("x",)}

_enabled: frozenset[str] = frozenset()


def install(checks: tuple[str, ...] = CHECKS) -> None:
    """Runs `checks` at the start of `fit`, `evaluate` and `predict` (the first call
    decides which).

    Args:
        checks: names from `CHECKS`.

    Raises:
        ValueError: `checks` names an unknown check.
    """
    global _enabled
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"call_checks.install: {sorted(unknown)!r} are not checks. "
                         f"Fix: use names from {CHECKS!r}.")
    if not _patch.installed(NAME):
        _enabled = frozenset(checks)
    if input_check.NAME in _enabled:
        input_order.install()
        input_check.install()
        later_batches.install()
    trainer = detection.trainer_class()
    for method, arguments in _CHECKED_ARGUMENTS.items():
        _patch.wrap(trainer, method, functools.partial(_checked_first, arguments=arguments),
                    by=NAME)


def _checked_first(method: Callable, arguments: tuple[str, ...]) -> Callable:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("_use_cached_eval_dataset"):  # fit's validation: checked by fit
            return method(self, *args, **kwargs)
        call = signature.bind_partial(self, *args, **kwargs)
        parity_probe.attach(self, method.__name__, call.arguments)
        if preflight.NAME in _enabled:
            preflight.run(self, method.__name__, call.arguments)
        if input_check.NAME not in _enabled:
            return method(*call.args, **call.kwargs)
        return input_check.checked_call(self, method, call, arguments)

    return wrapper
