"""The evaluator task's cost to training: the digits demo on 2 workers under
`launch.local`, with and without `--evaluator` (disttrain.SidecarEvaluator evaluating
every committed checkpoint), alternating. The chief's median time in a training step
per epoch (from the launcher's step timing, first epoch left out) is compared."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import Row, Stat, ratio_row
from benchmarks.settings import Settings
from disttrain.report import step_timing
from disttrain.testing import worker_env

WORKERS = 2


def _run(evaluator: bool, epochs: int) -> dict[str, Any]:
    """One launcher job; the chief's per-epoch step times and the rows evaluated."""
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-eval-") as tmp:
        logs, out = Path(tmp, "logs"), Path(tmp, "out")
        command = [sys.executable, "-m", "launch.local", "--workers", str(WORKERS),
                   "--log-dir", str(logs), *(["--evaluator"] if evaluator else []), "--",
                   sys.executable, "-m", "disttrain.demo", "--epochs", str(epochs),
                   "--patience", str(epochs + 1), "--no-tensorboard", "--output-dir", str(out)]
        run = subprocess.run(command, env=worker_env(), capture_output=True, text=True,
                             timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {run.returncode}:\n"
                               f"{run.stderr[-3000:]}")
        epochs_timed = step_timing.read(str(logs / "timing-w0.json"))[1:]
        evaluated = [row for path in out.glob("*/evaluation.csv")
                     for row in csv.DictReader(path.open())]
    return {"step_ms": statistics.median(e["step_s"] for e in epochs_timed) * 1000,
            "evaluated": len(evaluated)}


def measure(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    epochs = max(3, settings.demo_epochs // 8)
    measured: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for round_ in range(settings.rounds):
        order = ["without", "with"] if round_ % 2 == 0 else ["with", "without"]
        for name in order:
            measured[name].append(_run(name == "with", epochs))
    return measured


def rows(measured: dict[str, list[dict[str, Any]]], settings: Settings) -> list[Row]:
    evaluated = Stat.of([r["evaluated"] for r in measured["with"]]).show("", 0)
    row = ratio_row(
        f"digits demo, {WORKERS} workers: training step with the evaluator task running",
        [r["step_ms"] for r in measured["with"]], "without an evaluator",
        [r["step_ms"] for r in measured["without"]], " ms", digits=2)
    return [Row(row.what, f"{row.disttrain} ({evaluated} checkpoints evaluated)", row.peer,
                row.ratio, row.goal)]
