"""The name of every file disttrain's callbacks, report and sidecar write into a run's directories.

One place, so a writer and its readers (another callback, `disttrain.report.history`,
the sidecar evaluator) agree without importing each other. The storage layer's
own files are named in `disttrain.storage`: each checkpoint's manifest
(`MANIFEST_NAME`), a manager's pending record (`PENDING_NAME`) and write probes
(`PROBE_PREFIX`). Importing this module imports nothing else.

Example:

>>> HISTORY_CSV
'history.csv'
"""

from __future__ import annotations

HISTORY_CSV = "history.csv"
"""`callbacks.recommended`'s CSVLogger writes it in the report directory; `report` reads it."""
HISTORY_TIMES = "history.json"
"""`TrainingReport`'s epoch wall times; `report` reads them."""
HISTORY_FIGURE = "history.png"
"""`report`'s figure of the history."""
BEST_CHECKPOINT = "best.json"
"""`ModelCheckpoint`'s index of its checkpoints (the best one first); the sidecar evaluator
reads it to find checkpoints, and writes its own under the same name beside its exports."""
EVALUATION_CSV = "evaluation.csv"
"""The sidecar evaluator's results, one row per evaluated checkpoint."""
EVALUATION_TENSORBOARD_RUN = "eval"
"""The sidecar evaluator's TensorBoard run, under its TensorBoard directory."""
BACKUP_PREFIX = "backup-"
"""`BackupAndRestore`'s backups: one directory per backup, named with this prefix."""
BACKUP_WEIGHTS = "model.weights.h5"
"""In a backup: the model's and optimizer's weights."""
BACKUP_CALLBACK_STATES = "callbacks.npz"
"""In a backup: the callbacks' states (e.g. EarlyStopping's wait and best)."""
BACKUP_PART = "worker-{rank}.json"
"""In a backup: what one worker records of it (its input's random state, its position)."""
