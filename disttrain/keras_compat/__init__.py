"""Narrow fixes that make Keras 3 `fit`/`evaluate`/`predict` work under multi-worker MWMS.

One module per fix; each is applied only when the defective code is present in
the installed Keras (detected from its source), so an upstream fix switches ours
off by itself. `apply()` also installs the stop agreement (any worker's stop
ends `fit` everywhere, whatever the callbacks' order). What each fix does, why,
and how it differs from Keras: `docs/keras_compat.md`.

Example:

>>> import disttrain.keras_compat as kc
>>> kc.apply()          # idempotent; disttrain.strategy() calls it for you
>>> sorted(kc.applied())  # doctest: +SKIP
['multi_worker_steps_per_execution', 'persistent_epoch_iterator', 'scalar_metric_reduction',
 'symbolic_build_local_batch', 'synced_batchnorm_statistics']

Set `DISTTRAIN_KERAS_COMPAT=0` to leave Keras untouched (for comparisons).
"""

from __future__ import annotations

import logging
import os
import threading

from disttrain.errors import KerasCompatError
from disttrain.keras_compat import (
    batchnorm,
    epoch_iterator,
    scalar_reduction,
    stop_agreement,
    steps_per_execution,
    symbolic_build,
)
from disttrain.keras_compat.batchnorm import sync_batchnorm_statistics

__all__ = ["ENV_DISABLE", "apply", "applied", "sync_batchnorm_statistics"]

ENV_DISABLE = "DISTTRAIN_KERAS_COMPAT"

_FIXES = (symbolic_build, scalar_reduction, steps_per_execution, epoch_iterator, batchnorm)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_applied: dict[str, str] = {}
_checked = False


def apply(skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Applies every fix the installed Keras needs, and the stop agreement, once per process.

    Safe to call many times and from several threads: the first call decides.
    Does nothing when `DISTTRAIN_KERAS_COMPAT=0`.

    Args:
        skip: names of fixes to leave out (to measure what a fix changes).

    Returns:
        The applied fixes: name → upstream reference.

    Raises:
        KerasCompatError: when Keras is not version 3 on the TensorFlow backend,
            or `skip` names an unknown fix.

    Example:

    ```python
    disttrain.keras_compat.apply(skip=("persistent_epoch_iterator",))  # Keras's iterators
    ```
    """
    global _checked
    unknown = set(skip) - {fix.NAME for fix in _FIXES}
    if unknown:
        raise KerasCompatError(
            f"skip={sorted(unknown)!r} names no fix. Fix: use names from "
            f"{[fix.NAME for fix in _FIXES]!r}."
        )
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return {}
    with _lock:
        if _checked:
            return dict(_applied)
        import keras

        major = int(keras.__version__.split(".")[0])
        if major != 3 or keras.backend.backend() != "tensorflow":
            raise KerasCompatError(
                f"disttrain needs Keras 3 on the TensorFlow backend; found keras=="
                f"{keras.__version__} with backend {keras.backend.backend()!r}. Fix: "
                "pip install 'keras>=3' and set KERAS_BACKEND=tensorflow."
            )
        for fix in _FIXES:
            if fix.NAME in skip:
                _log.warning("keras_compat: %s skipped on request", fix.NAME)
            elif fix.is_needed():
                fix.install()
                _applied[fix.NAME] = fix.UPSTREAM
            else:
                _log.info("keras_compat: %s not needed for keras %s", fix.NAME, keras.__version__)
        stop_agreement.install()
        _checked = True
        return dict(_applied)


def applied() -> dict[str, str]:
    """The fixes applied in this process so far (name → upstream reference).

    Example:

    ```python
    assert "synced_batchnorm_statistics" in disttrain.keras_compat.applied()
    ```
    """
    return dict(_applied)
