"""`python -m benchmarks`: disttrain's side-by-side benchmarks, one table.

Every comparison is measured in this run, on this machine, with the two sides
interleaved (fresh localhost clusters, alternating), and reported as medians
with their range over rounds; ratios are medians of per-round ratios. Machines
are noisy: compare ratios, not absolute times across runs.

    python -m benchmarks            # full run (its checkpoint section alone: ~17 min on 2 cores)
    python -m benchmarks --quick    # about 12 minutes on 2 cores
    python -m benchmarks --smoke    # about 3 minutes: checks that it works (CI)
    python -m benchmarks --scale    # adds agreement at 2 to 16 local processes
    python -m benchmarks --write-docs   # also puts the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import (
    batchnorm,
    checkpoint,
    compression,
    docs_page,
    early_stopping,
    evaluator,
    input_check,
    input_order,
    launcher,
    scale,
    scaling,
    sparse_gradients,
    train_step,
    vote,
)
from benchmarks.report import Row, table
from benchmarks.settings import FULL, QUICK, SMOKE, Settings

SECTIONS = ("train", "compression", "sparse_gradients", "input_check", "input_order",
            "checkpoint", "early_stopping", "evaluator", "launcher")


def machine() -> str:
    """One line: cores, CPU, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for package in ("tensorflow", "keras", "tf_keras"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return (f"{os.cpu_count()} CPU cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def _train(settings: Settings) -> tuple[list[Row], str]:
    measured = train_step.measure(settings)
    dist = measured["disttrain"]
    return (train_step.rows(measured, settings) + batchnorm.rows(dist) + vote.rows(dist)
            + scaling.rows(measured, settings), scaling.model(measured, settings))


def _compression(settings: Settings) -> tuple[list[Row], str]:
    return compression.rows(compression.measure(settings), settings), ""


def _sparse_gradients(settings: Settings) -> tuple[list[Row], str]:
    return sparse_gradients.rows(sparse_gradients.measure(settings), settings), ""


def _input_check(settings: Settings) -> tuple[list[Row], str]:
    return input_check.rows(input_check.measure(settings), settings), ""


def _input_order(settings: Settings) -> tuple[list[Row], str]:
    return input_order.rows(input_order.measure(settings)), ""


def _checkpoint(settings: Settings) -> tuple[list[Row], str]:
    return checkpoint.rows(checkpoint.measure(settings), settings), ""


def _early_stopping(settings: Settings) -> tuple[list[Row], str]:
    return early_stopping.rows(early_stopping.measure(settings), settings), ""


def _evaluator(settings: Settings) -> tuple[list[Row], str]:
    return evaluator.rows(evaluator.measure(settings), settings), ""


def _launcher(settings: Settings) -> tuple[list[Row], str]:
    return launcher.rows(launcher.measure(settings)), ""


def _scale(settings: Settings) -> tuple[list[Row], str]:
    measured = scale.measure(settings)
    return scale.rows(measured), scale.model(measured)


RUNNERS: dict[str, Callable[[Settings], tuple[list[Row], str]]] = {
    "train": _train, "compression": _compression, "sparse_gradients": _sparse_gradients,
    "input_check": _input_check, "input_order": _input_order, "checkpoint": _checkpoint,
    "early_stopping": _early_stopping, "evaluator": _evaluator,
    "launcher": _launcher, "scale": _scale,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and epochs (minutes)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, one round: checks the script works; numbers mean nothing")
    parser.add_argument("--only", nargs="+", choices=(*SECTIONS, "scale"),
                        default=list(SECTIONS), help="run only these sections")
    parser.add_argument("--scale", action="store_true",
                        help="also measure agreement at 2 to 16 local processes (section scale)")
    parser.add_argument("--write-docs", nargs="?", const=docs_page.PAGE, type=Path,
                        metavar="PAGE", help="also write the table and notes into the measured "
                        "part of PAGE (default: %(const)s)")
    args = parser.parse_args(argv)
    if args.scale and "scale" not in args.only:
        args.only.append("scale")
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    rows: list[Row] = []
    notes: list[str] = []
    started = time.monotonic()
    for name in args.only:
        print(f"[benchmarks] {name} ({settings.name})...", file=sys.stderr, flush=True)
        section_rows, note = RUNNERS[name](settings)
        rows += section_rows
        notes += [note] if note else []
    seconds, machine_line, rendered = time.monotonic() - started, machine(), table(rows)
    print(f"disttrain benchmarks ({settings.name}, {seconds:.0f} s): {machine_line}\n")
    print(rendered)
    for note in notes:
        print(f"\n{note}")
    if args.write_docs:
        command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
        docs_page.write(docs_page.render(command, seconds, machine_line, rendered, notes),
                        args.write_docs)
        print(f"[benchmarks] wrote the measured part of {args.write_docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
