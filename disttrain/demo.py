"""The default job: a digits classifier trained with the full disttrain callback stack.

Runs single-process or as one task of a multi-worker cluster (TF_CONFIG, as set
by `python -m launch.local`). The data is scikit-learn's bundled 8x8 digits
(1,797 images, no download). Only the chief prints per-epoch logs and the
summary; every worker returns the same result. The evaluator task, if any, runs
a `disttrain.SidecarEvaluator` on the validation data: every checkpoint the
chief commits is evaluated into `<output-dir>/<run id>/evaluation.csv`, the
`eval` run of the TensorBoard logs and `best_evaluated/`.

Example:

```
python -m disttrain.demo --epochs 20
python -m launch.local --workers 4          # the same job on 4 local workers
python -m launch.local --workers 2 --evaluator   # and an evaluator beside them
```
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_OUTPUT = "disttrain-demo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.demo",
        description="Train a digits classifier with disttrain's strategy and callbacks.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="maximum epochs (default 20)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="GLOBAL batch size, split across workers (default 64)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT,
                        help="directory or fsspec URL; outputs go to <output-dir>/<run id> "
                             f"(default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--patience", type=int, default=5,
                        help="epochs without val_loss improvement before stopping (default 5)")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard logs")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: must be at least 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.patience < 0:
        parser.error(f"--patience {args.patience}: must be 0 or more")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate {args.learning_rate}: must be positive")


def load_digits() -> tuple[Any, Any, Any, Any]:
    """Digits split 80/20 into train and validation, scaled to [0, 1], fixed order."""
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def datasets(batch_size: int) -> tuple[Any, Any]:
    """Training (reshuffled each epoch, fixed seed) and validation `tf.data` datasets of
    the digits, batched with the GLOBAL batch size."""
    import tensorflow as tf

    x_train, y_train, x_val, y_val = load_digits()
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=0, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    return train, tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch_size)


def build_model(learning_rate: float) -> Any:
    """The demo's classifier, compiled, with fixed initial weights (call it in the
    strategy's scope)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains and returns the summary (identical on every worker)."""
    import disttrain
    from disttrain import coordination, storage

    strategy = disttrain.strategy()
    coord = coordination.get()
    run_id = coord.run_id()
    out = storage.join(args.output_dir, run_id)
    if args.batch_size < coord.num_workers:
        raise SystemExit(
            f"--batch-size {args.batch_size} is smaller than the {coord.num_workers} workers; "
            "each worker needs at least one sample per step. Fix: raise --batch-size."
        )
    train_ds, val_ds = datasets(args.batch_size)
    with strategy.scope():
        model = build_model(args.learning_rate)
    callbacks = disttrain.callbacks.recommended(
        out, monitor="val_loss", patience=args.patience, tensorboard=not args.no_tensorboard,
    )
    started = time.monotonic()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=callbacks, shuffle=False,
        verbose=2 if coord.is_chief else 0,
    )
    checkpoint = next(c for c in callbacks if isinstance(c, disttrain.callbacks.ModelCheckpoint))
    final = model.evaluate(val_ds, verbose=0, return_dict=True)
    val_losses = history.history["val_loss"]
    best_epoch = min(range(len(val_losses)), key=val_losses.__getitem__)
    return {
        "run_id": run_id,
        "workers": coord.num_workers,
        "epochs_run": len(val_losses),
        "best_epoch": best_epoch + 1,
        "best_val_loss": round(val_losses[best_epoch], 4),
        "best_val_accuracy": round(history.history["val_accuracy"][best_epoch], 4),
        "restored_val_accuracy": round(final["accuracy"], 4),
        "best_checkpoint": checkpoint.best_checkpoint()["path"],
        "output_dir": out,
        "seconds": round(time.monotonic() - started, 1),
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluator task: evaluates every checkpoint the training tasks commit, until
    training has finished; returns the summary."""
    import disttrain
    from disttrain import coordination, storage

    disttrain.strategy()  # the default strategy: the evaluator never joins training
    run_id = coordination.get().run_id()
    out = storage.join(args.output_dir, run_id)
    _, val_ds = datasets(args.batch_size)
    evaluator = disttrain.SidecarEvaluator(
        build_model(args.learning_rate), val_ds, storage.join(out, "checkpoints"),
        tensorboard_dir=None if args.no_tensorboard else storage.join(out, "tensorboard"),
        export_dir=storage.join(out, "best_evaluated"), monitor="loss", poll_interval=1.0,
    )
    rows = evaluator.start()
    summary: dict[str, Any] = {"run_id": run_id, "evaluated": len(rows),
                               "skipped": len(evaluator.skipped)}
    if rows:
        best = min(rows, key=lambda row: row["loss"])
        summary.update(best_epoch=best["epoch"], best_loss=round(best["loss"], 4),
                       best_accuracy=round(best["accuracy"], 4))
    summary["evaluation_csv"] = evaluator.csv_path
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    from disttrain.cluster import Cluster

    cluster = Cluster.from_env()
    if cluster.is_evaluator:
        _print_summary("disttrain demo evaluator summary", evaluate(args))
        return 0
    summary = train(args)
    if cluster.is_chief:
        _print_summary("disttrain demo summary", summary)
    return 0


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    print(f"\n{title}")
    for key, value in summary.items():
        print(f"  {key:<22} {value}")


if __name__ == "__main__":
    sys.exit(main())
