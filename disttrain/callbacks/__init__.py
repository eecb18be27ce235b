"""Strategy-safe drop-in replacements for `keras.callbacks`, and the recommended stack.

Each callback takes the same arguments as its Keras namesake; the differences
(all on the safe side for multi-worker training) are in each docstring.
"""

from __future__ import annotations

import importlib
from typing import Any

from disttrain._tf import require_tensorflow

require_tensorflow("disttrain.callbacks")

_EXPORTS = {
    "DistributedCallback": "disttrain.callbacks.base",
    "ModelCheckpoint": "disttrain.callbacks.model_checkpoint",
    "EarlyStopping": "disttrain.callbacks.early_stopping",
    "ReduceLROnPlateau": "disttrain.callbacks.reduce_lr_on_plateau",
    "TerminateOnNaN": "disttrain.callbacks.terminate_on_nan",
    "CSVLogger": "disttrain.callbacks.csv_logger",
    "TensorBoard": "disttrain.callbacks.tensorboard",
    "SyncStop": "disttrain.callbacks.sync_stop",
    "BackupAndRestore": "disttrain.callbacks.backup_and_restore",
    "TrainingReport": "disttrain.callbacks.training_report",
    "recommended": "disttrain.callbacks.stack",
    "on_chief": "disttrain.callbacks.on_chief",
    "OnChief": "disttrain.callbacks.on_chief",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'disttrain.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
