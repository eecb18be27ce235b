"""The recommended callback stack, in the order that makes it correct."""

from __future__ import annotations

import importlib.util
import warnings

from disttrain import coordination, storage
from disttrain.report import run_files


def recommended(
    directory: str,
    monitor: str = "val_loss",
    mode: str = "auto",
    patience: int = 5,
    lr_patience: int = 2,
    lr_factor: float = 0.5,
    max_to_keep: int = 3,
    save_weights_only: bool = False,
    tensorboard: bool = True,
    backup: bool = True,
    verbose: int = 0,
) -> list:
    """Returns the callbacks most multi-worker jobs want, in the right order.

    Order: `BackupAndRestore` → `ReduceLROnPlateau` → `EarlyStopping` →
    `ModelCheckpoint` → `CSVLogger` → `TrainingReport` → `TensorBoard`. The LR
    change is applied before the early-stopping decision, and the checkpoint sees the final
    decision of the epoch. A stop asked by any callback on any worker, from these
    or from callbacks the caller adds anywhere in the list, is agreed across
    workers after the epoch's callbacks ran (see `disttrain.keras_compat`), so
    no `SyncStop` is needed. The backup makes a restarted job (same
    `directory`, e.g. the same run id after `launch.local --max-restarts`)
    resume where it stopped, callback state included.

    Layout under `directory` (any fsspec URL):
    `checkpoints/epoch<NNN>-<monitor><value>.keras` (best `max_to_keep`, manifest
    `checkpoints/best.json`), `history.csv`, `history.json` (epoch times, restarts),
    `history.png` (the training curves, drawn at the end of `fit` when matplotlib is
    installed), `tensorboard/`, `backup/` (removed when training ends normally).

    Args:
        directory: where everything goes; make it unique per run (e.g. include
            the run id) — an existing run's checkpoints are never overwritten.
        monitor: metric that drives LR reduction, early stopping and "best".
        mode: `"auto"`, `"min"` or `"max"` for `monitor`.
        patience: epochs without improvement before stopping.
        lr_patience: epochs without improvement before reducing the LR.
        lr_factor: factor the LR is multiplied by.
        max_to_keep: best checkpoints kept.
        save_weights_only: save `.weights.h5` instead of `.keras`.
        tensorboard: include TensorBoard (chief only). Left out, with a warning,
            when the optional `tensorboard` package is not installed.
        backup: include BackupAndRestore (resume after a failure).
        verbose: verbosity of the callbacks (messages on the chief).

    Example:

    ```python
    callbacks = disttrain.callbacks.recommended("gs://bucket/runs/exp-7")
    model.fit(train, validation_data=val, epochs=100, callbacks=callbacks)
    ```
    """
    from disttrain.callbacks import (
        BackupAndRestore,
        CSVLogger,
        EarlyStopping,
        ModelCheckpoint,
        ReduceLROnPlateau,
        TensorBoard,
        TrainingReport,
    )

    extension = ".weights.h5" if save_weights_only else ".keras"
    checkpoint_name = f"epoch{{epoch:03d}}-{monitor}{{{monitor}:.4f}}{extension}"
    stack = [BackupAndRestore(storage.join(directory, "backup"), verbose=verbose)] if backup else []
    stack += [
        ReduceLROnPlateau(monitor=monitor, mode=mode, factor=lr_factor, patience=lr_patience,
                          verbose=verbose),
        EarlyStopping(monitor=monitor, mode=mode, patience=patience, verbose=verbose),
        ModelCheckpoint(
            storage.join(directory, "checkpoints", checkpoint_name), monitor=monitor, mode=mode,
            save_best_only=True, save_weights_only=save_weights_only, max_to_keep=max_to_keep,
            verbose=verbose,
        ),
        CSVLogger(storage.join(directory, run_files.HISTORY_CSV), append=True),
        TrainingReport(directory, monitor=monitor, mode=mode),
    ]
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        if coordination.get().is_chief:  # the same on every worker: say it once
            warnings.warn("recommended(): TensorBoard left out because the optional 'tensorboard' "
                          "package is not installed. Fix: pip install tensorboard, or pass "
                          "tensorboard=False.", stacklevel=2)
    elif tensorboard:
        stack.append(TensorBoard(storage.join(directory, "tensorboard")))
    return stack
