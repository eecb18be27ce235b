"""A run's training curves and a short text summary: `python -m disttrain.report RUN_DIR`.

A run directory (any fsspec URL) holds `history.csv` (one row per epoch, written
by `disttrain.callbacks.CSVLogger`) and `history.json` (when each epoch ran and
which process trained it, written by `disttrain.callbacks.TrainingReport`). From
them this module draws `history.png`: one panel per metric (loss first), training
solid and validation dashed, the learning rate's changes and the restarts as
vertical lines, the best epoch of the monitored metric marked. The chief draws it
at the end of `fit` (the `TrainingReport` callback, in `recommended()`);
`python -m disttrain.report RUN_DIR` re-draws it, for a finished or a running run,
and prints a summary (epochs, best, time per epoch, restarts).

Drawing needs matplotlib (`pip install "disttrain[report]"`); without it the
summary still prints and the figure is skipped with a one-line notice. Importing
this module imports neither TensorFlow nor matplotlib.

Example:

```
python -m disttrain.report gs://bucket/runs/20261202-031721-c9612e
```
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from disttrain import storage
from disttrain.report import run_files
from disttrain.errors import MissingDependencyError, StorageError

INSTALL_FIX = 'pip install "disttrain[report]" (matplotlib)'

_MAX_IS_BETTER = ("acc", "auc", "precision", "recall", "f1")
_LR = "learning_rate"


def better_mode(monitor: str) -> str:
    """`"max"` for metrics where higher is better (accuracy, AUC, ...), else `"min"`,
    as Keras's `mode="auto"` decides."""
    return "max" if any(part in monitor for part in _MAX_IS_BETTER) else "min"


@dataclasses.dataclass
class Run:
    """What a run directory says about its training.

    Attributes:
        directory: the run directory (URL).
        epochs: 1-based epoch numbers, one per row of `history.csv`.
        columns: metric name → one value per epoch (NaN where the row has none).
        monitor: the metric that decides "best", or None without a usable one.
        mode: `"min"` or `"max"` for `monitor`.
        seconds: 1-based epoch → its wall time in seconds (from `history.json`).
        restarts: 1-based epochs a new process resumed training at.
    """

    directory: str
    epochs: list[int]
    columns: dict[str, list[float]]
    monitor: str | None
    mode: str
    seconds: dict[int, float]
    restarts: list[int]

    def best(self) -> tuple[int, float] | None:
        """(epoch, value) of the best `monitor` value, or None."""
        if self.monitor is None:
            return None
        scored = [(e, v) for e, v in zip(self.epochs, self.columns[self.monitor])
                  if not math.isnan(v)]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda item: item[1])

    def lr_changes(self) -> list[tuple[int, float]]:
        """(epoch, new learning rate) for each epoch whose rate differs from the last."""
        rates = self.columns.get(_LR)
        if rates is None:
            return []
        return [(epoch, new) for epoch, old, new in zip(self.epochs[1:], rates, rates[1:])
                if not math.isclose(old, new, rel_tol=1e-6)]


def read_run(directory: str) -> Run:
    """Reads `history.csv` and, when present, `history.json` of a run directory.

    Raises:
        StorageError: the directory has no `history.csv`, or it cannot be read.
    """
    csv_url = storage.join(directory, run_files.HISTORY_CSV)
    if not storage.exists(csv_url):
        raise StorageError(
            f"{csv_url} does not exist: no epoch of this run has ended yet, or {directory!r} "
            "is not a run directory. Fix: pass the directory given to "
            "disttrain.callbacks.recommended() (or holding CSVLogger's history.csv).")
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(csv_url).decode("utf-8"))))
    epochs = [int(row.pop("epoch")) + 1 for row in rows]
    names = list(rows[0]) if rows else []
    columns = {name: [_number(row.get(name)) for row in rows] for name in names}
    times = storage.read_json(storage.join(directory, run_files.HISTORY_TIMES)) or {}
    monitor = times.get("monitor")
    if monitor not in columns:
        monitor = next((m for m in ("val_loss", "loss") if m in columns), None)
    mode = times.get("mode") if times.get("monitor") == monitor else None
    return Run(
        directory=directory, epochs=epochs, columns=columns, monitor=monitor,
        mode=mode if mode in ("min", "max") else better_mode(monitor or ""),
        seconds={int(e): float(v["seconds"]) for e, v in times.get("epochs", {}).items()},
        restarts=restarts(times.get("starts", [])),
    )


def restarts(starts: Sequence[dict[str, Any]]) -> list[int]:
    """The epochs a new process began training at, after the first process."""
    return [s["epoch"] for prev, s in zip(starts, starts[1:]) if s["process"] != prev["process"]]


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def draw(run: Run) -> bytes:
    """The run's figure as PNG bytes.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependencyError(
            f"drawing the training figure needs matplotlib, which is not installed for "
            f"{sys.executable}. Fix: {INSTALL_FIX}.") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups = [name for name in run.columns if not name.startswith("val_") and name != _LR]
    groups += [n[4:] for n in run.columns if n.startswith("val_") and n[4:] not in groups]
    groups.sort(key=lambda name: name != "loss")
    cols = min(3, len(groups)) or 1
    rows = max(1, math.ceil(len(groups) / cols))
    figure = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=90, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    best = run.best()
    for ax, name in zip(axes, groups):
        for column, style, label in ((name, "-", "train"), (f"val_{name}", "--", "validation")):
            if column in run.columns:
                ax.plot(run.epochs, run.columns[column], style, marker=".", label=label)
        for epoch, rate in run.lr_changes():
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"lr {rate:.3g}", (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                        fontsize=7, color="grey", rotation=90, va="top", ha="right")
        for epoch in run.restarts:
            ax.axvline(epoch - 0.5, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate("restart", (epoch - 0.5, 0), xycoords=("data", "axes fraction"),
                        fontsize=7, color="tab:red", rotation=90, va="bottom", ha="right")
        if best is not None:
            ax.axvline(best[0], color="tab:green", alpha=0.3, linewidth=3)
        if best is not None and run.monitor in (name, f"val_{name}"):
            ax.plot([best[0]], [best[1]], "*", color="tab:green", markersize=12,
                    label=f"best {run.monitor} (epoch {best[0]})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_figure(run: Run, url: str | None = None) -> str | None:
    """Draws the figure and commits it atomically to `url` (default: `history.png` in the
    run directory); returns the URL, or None after a one-line notice on stderr when
    matplotlib is not installed.

    Raises:
        StorageError: the figure cannot be written.
    """
    url = url or storage.join(run.directory, run_files.HISTORY_FIGURE)
    try:
        png = draw(run)
    except MissingDependencyError:
        print(f"disttrain: no training figure (matplotlib is not installed); {INSTALL_FIX} "
              "draws it", file=sys.stderr, flush=True)
        return None
    storage.atomic_write_bytes(url, png)
    return url


def summary(run: Run, figure: str | None = None) -> str:
    """A few lines: epochs, best, time per epoch, restarts (and the figure, if given)."""
    lines = [f"run {run.directory}", f"  epochs        {len(run.epochs)}"]
    best = run.best()
    if best is not None:
        lines.append(f"  best          {run.monitor} {best[1]:.4g} at epoch {best[0]} "
                     f"({run.mode} is better)")
    if run.monitor is not None and run.epochs:
        lines.append(f"  last          {run.monitor} {run.columns[run.monitor][-1]:.4g} "
                     f"at epoch {run.epochs[-1]}")
    if run.seconds:
        times = list(run.seconds.values())
        slowest = max(run.seconds, key=run.seconds.__getitem__)
        lines.append(f"  time/epoch    median {statistics.median(times):.2f}s, slowest "
                     f"{run.seconds[slowest]:.2f}s (epoch {slowest})")
    changes = ", ".join(f"{rate:.3g} from epoch {epoch}" for epoch, rate in run.lr_changes())
    if changes:
        lines.append(f"  lr changes    {changes}")
    lines.append(f"  restarts      {len(run.restarts)}"
                 + (f" (resumed at epoch {', '.join(map(str, run.restarts))})"
                    if run.restarts else ""))
    if figure:
        lines.append(f"  figure        {figure}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.report",
        description="Re-draw a run's training figure (history.png) and print a summary.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="directory or fsspec URL holding history.csv")
    parser.add_argument("--no-figure", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    try:
        run = read_run(args.run_dir)
        figure = None if args.no_figure else write_figure(run)
    except StorageError as e:
        print(f"disttrain.report: {e}", file=sys.stderr)
        return 1
    print(summary(run, figure))
    return 0

