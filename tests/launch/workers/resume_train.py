"""A training script for the launchers' resume tests: exact resume through a restart.

Trains `tests/resume/resume_workloads.py`'s model on its reshuffling, randomly augmented input
(192 samples, global batch 24: 8 steps an epoch) with
`disttrain.callbacks.BackupAndRestore(BACKUP_DIR, save_freq=1)`, as a user's script would
under `python -m launch.local` or in the pods of `python -m launch.k8s`.

Usage: resume_train.py --backup-dir DIR --out FILE [--sigterm [ATTEMPT:]RANK:EPOCH:BATCH ...]
                       [--reference FILE]

  --backup-dir     BackupAndRestore's directory; may use {run_id}
  --out            the chief writes the final weights here (JSON) once training finished
  --sigterm        after that batch (0-based epoch and batch) the worker of that rank sends
                   itself SIGTERM, only in launch.local's attempt ATTEMPT (DISTTRAIN_ATTEMPT)
                   when given, and waits until every worker acknowledged it, so the backup
                   is taken after the next batch and every worker exits with 75; repeatable
  --reference      in the first attempt, before anything else, train a fresh model without
                   backups (the uninterrupted run); the chief writes its weights to FILE
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

# The repository root (tests/launch/workers/ is three levels below it), for `disttrain`/`tests`.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.resume import resume_workloads as rw  # noqa: E402
from tests.support.weights import weight_lists  # noqa: E402


def _sigterm_point(text: str) -> tuple[str | None, int, int, int]:
    parts = text.split(":")
    attempt = parts.pop(0) if len(parts) == 4 else None
    rank, epoch, batch = (int(p) for p in parts)
    return attempt, rank, epoch, batch


def _attempt() -> str:
    return os.environ.get("DISTTRAIN_ATTEMPT", "0")


def _fit(backup_dir: str | None, sigterms: list[tuple[str | None, int, int, int]]) -> list:
    import keras

    from disttrain import callbacks, coordination

    model, train, _ = rw._fresh()
    coordinator = coordination.get()
    points = {point[1:] for point in sigterms if point[0] in (None, _attempt())}

    class SigtermSelf(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (coordinator.rank, self.epoch, batch) not in points:
                return
            print(f"sending SIGTERM to myself after epoch {self.epoch + 1}, batch {batch + 1}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            coordinator.collect("preemption/ack")

    stack = [] if backup_dir is None else [
        callbacks.BackupAndRestore(backup_dir, save_freq=1, verbose=1)]
    model.fit(train, epochs=rw.EPOCHS, verbose=0, callbacks=[*stack, SigtermSelf()])
    return weight_lists(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backup-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sigterm", type=_sigterm_point, action="append", default=[])
    parser.add_argument("--reference")
    args = parser.parse_args()
    if args.reference and _attempt() == "0":
        _write_on_chief(args.reference, _fit(None, []))
    _write_on_chief(args.out, _fit(args.backup_dir, args.sigterm))


def _write_on_chief(path: str, weights: list) -> None:
    from disttrain import coordination

    if coordination.get().is_chief:
        with open(path, "w") as f:
            json.dump(weights, f)


if __name__ == "__main__":
    main()
