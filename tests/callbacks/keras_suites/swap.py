"""Pytest plugin: Keras's own callback test files, run against disttrain's classes.

Loaded with `-p tests.callbacks.keras_suites.swap`; before Keras's test modules import, it
replaces each callback class that disttrain provides in `keras.src.callbacks`
(the namespace those tests read, `callbacks.EarlyStopping(...)`) with
disttrain's. Keras's own training code does not read these names, so only the
tests see the swap.
"""

from __future__ import annotations

SWAPPED = ("BackupAndRestore", "CSVLogger", "EarlyStopping", "ModelCheckpoint",
           "ReduceLROnPlateau", "TerminateOnNaN")


def pytest_configure(config) -> None:
    import keras.src.callbacks as keras_callbacks

    import disttrain.callbacks

    for name in SWAPPED:
        setattr(keras_callbacks, name, getattr(disttrain.callbacks, name))
