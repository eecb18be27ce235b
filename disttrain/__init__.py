"""disttrain: correct, boring multi-worker TensorFlow/Keras 3 training.

Importing `disttrain` does not import TensorFlow; the heavy parts load on first use.

Example:

```python
import disttrain, keras

strategy = disttrain.strategy()
with strategy.scope():
    model = keras.Sequential([...])
    model.compile(...)
model.fit(ds, epochs=10, callbacks=disttrain.callbacks.recommended("gs://bucket/run"))
```
"""

from __future__ import annotations

import importlib
from typing import Any

from disttrain.cluster import Cluster
from disttrain.errors import (
    PREEMPTED_EXIT_CODE,
    CallbackConfigError,
    ClusterConfigError,
    CoordinationError,
    DisttrainError,
    InputMismatchError,
    KerasCompatError,
    LaterBatchMismatchError,
    MissingDependencyError,
    Preempted,
    PreflightError,
    StorageConfigError,
    StorageError,
    StrategyError,
)

__version__ = "0.1.0"

_LAZY = {
    "strategy": ("disttrain.distribute", "strategy"),
    "callbacks": ("disttrain.callbacks", None),
    "coordination": ("disttrain.coordination", None),
    "storage": ("disttrain.storage", None),
    "keras_compat": ("disttrain.keras_compat", None),
    "testing": ("disttrain.testing", None),
    "SidecarEvaluator": ("disttrain.sidecar", "SidecarEvaluator"),
}

__all__ = [
    "Cluster",
    "CallbackConfigError",
    "ClusterConfigError",
    "CoordinationError",
    "DisttrainError",
    "InputMismatchError",
    "KerasCompatError",
    "LaterBatchMismatchError",
    "MissingDependencyError",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "PreflightError",
    "StorageConfigError",
    "StorageError",
    "StrategyError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'disttrain' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
