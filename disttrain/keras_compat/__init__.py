"""Narrow fixes that make Keras 3 `fit`/`evaluate`/`predict` work under multi-worker MWMS.

One module per fix, named like the fix; each is applied only when the defective
code is present in the installed Keras (detected from its source), so an
upstream fix switches ours off by itself. `apply()` also installs the stop
agreement (any worker's stop ends `fit` everywhere, whatever the callbacks'
order) and the call checks (`call_checks`: the preflight, then the input check,
at the start of `fit`, `evaluate` and `predict`). Every Keras or TensorFlow
attribute replaced goes through one register (`_patch`); `patches()` lists
them in order. What each fix does, why, and how it differs from Keras:
`docs/keras_compat.md`; the layers and the register: `docs/architecture.md`.

Example:

>>> import disttrain.keras_compat as kc
>>> kc.apply()          # idempotent; disttrain.strategy() calls it for you
>>> sorted(kc.applied())  # doctest: +SKIP
['gradients_reduced_before_apply', 'multi_worker_atomic_saves',
 'multi_worker_cpu_without_xla', 'multi_worker_steps_per_execution',
 'persistent_epoch_iterator', 'scalar_metric_reduction', 'symbolic_build_local_batch',
 'synced_batchnorm_statistics']

Set `DISTTRAIN_KERAS_COMPAT=0` to leave Keras untouched (for comparisons).
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

from disttrain.errors import KerasCompatError
from disttrain.keras_compat import (
    call_checks,
    detection,
    gradients_reduced_before_apply,
    multi_worker_atomic_saves,
    multi_worker_cpu_without_xla,
    multi_worker_steps_per_execution,
    persistent_epoch_iterator,
    scalar_metric_reduction,
    stop_agreement,
    symbolic_build_local_batch,
    synced_batchnorm_statistics,
    versions,
)
from disttrain.keras_compat._patch import Patch, patches
from disttrain.keras_compat.synced_batchnorm_statistics import sync_batchnorm_statistics

__all__ = ["ENV_DISABLE", "Patch", "apply", "applied", "patches", "sync_batchnorm_statistics"]

ENV_DISABLE = "DISTTRAIN_KERAS_COMPAT"

_FIXES = (symbolic_build_local_batch, scalar_metric_reduction, multi_worker_steps_per_execution,
          multi_worker_cpu_without_xla, persistent_epoch_iterator, synced_batchnorm_statistics,
          gradients_reduced_before_apply, multi_worker_atomic_saves)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_applied: dict[str, str] = {}
_checked = False


def apply(skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Applies every fix the installed Keras needs, the stop agreement and the call
    checks (preflight, input check), once per process.

    Safe to call many times and from several threads: the first call decides.
    Does nothing when `DISTTRAIN_KERAS_COMPAT=0`.

    Args:
        skip: names of fixes to leave out (to measure what a fix changes), and
            `"preflight"` or `"input_check"` to leave out that check (each alone).

    Returns:
        The applied fixes: name → upstream reference.

    Raises:
        KerasCompatError: before anything is patched, when Keras or TensorFlow is
            outside the supported range (`versions.py`), Keras is not on the
            TensorFlow backend, a fix cannot find the Keras code it patches, or
            `skip` names an unknown fix.

    Example:

    ```python
    disttrain.keras_compat.apply(skip=("persistent_epoch_iterator",))  # Keras's iterators
    ```
    """
    global _checked
    skippable = [fix.NAME for fix in _FIXES] + list(call_checks.CHECKS)
    unknown = set(skip) - set(skippable)
    if unknown:
        raise KerasCompatError(
            f"skip={sorted(unknown)!r} names no fix. Fix: use names from {skippable!r}."
        )
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return {}
    with _lock:
        if _checked:
            return dict(_applied)
        import keras
        import tensorflow as tf

        versions.check(keras.__version__, tf.__version__)
        if keras.backend.backend() != "tensorflow":
            raise KerasCompatError(
                f"disttrain needs Keras on the TensorFlow backend; found backend "
                f"{keras.backend.backend()!r}. Fix: set KERAS_BACKEND=tensorflow."
            )
        needed = {fix.NAME: _is_needed(fix, keras.__version__) for fix in _FIXES
                  if fix.NAME not in skip}
        for fix in _FIXES:
            if fix.NAME in skip:
                _log.warning("keras_compat: %s skipped on request", fix.NAME)
            elif needed[fix.NAME]:
                fix.install()
                _applied[fix.NAME] = fix.UPSTREAM
            else:
                _log.info("keras_compat: %s not needed for keras %s", fix.NAME, keras.__version__)
        stop_agreement.install()
        for check in call_checks.CHECKS:
            if check in skip:
                _log.warning("keras_compat: %s skipped on request", check)
        checks = tuple(check for check in call_checks.CHECKS if check not in skip)
        if checks:
            call_checks.install(checks)
        _checked = True
        return dict(_applied)


def _is_needed(fix: ModuleType, keras_version: str) -> bool:
    """`fix.is_needed()`; a `KerasCompatError` naming the fix when its target is missing."""
    try:
        return fix.is_needed()
    except (detection.TargetNotFound, ImportError) as e:
        raise KerasCompatError(
            f"keras_compat fix {fix.NAME!r} cannot find the Keras code it patches in "
            f"keras=={keras_version} ({e}); without it multi-worker training fails or "
            f"differs from Keras (docs/keras_compat.md#{fix.NAME}). Fix: pip install "
            f"{' '.join(repr(r) for r in versions.requirements())}, or go on without this "
            f"fix knowingly: disttrain.keras_compat.apply(skip=({fix.NAME!r},)) before "
            "disttrain.strategy()."
        ) from e


def applied() -> dict[str, str]:
    """The fixes applied in this process so far (name → upstream reference).

    Example:

    ```python
    assert "synced_batchnorm_statistics" in disttrain.keras_compat.applied()
    ```
    """
    return dict(_applied)
