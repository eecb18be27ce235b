"""Fault injection over many seeds: SIGKILL a random worker at a random step, restart, compare.

Usage:

    python -m benchmarks.faults --seeds 50 --workers 3

First one uninterrupted job gives the reference weights. Then, for each seed,
`random.Random(seed)` picks a victim rank and a global step; the victim SIGKILLs
itself after that step of attempt 0 of a real job under
`python -m launch.local --max-restarts 1` with
`BackupAndRestore(save_freq="epoch")` (`benchmarks.fault_workloads.fault_train`).
A seed is `ok` when the job exits 0 after exactly 2 attempts, every worker ran
the planned epochs (resuming at the interrupted one) and ended with weights
within 1e-5 of the reference; otherwise the row says what went wrong. Prints
one row per seed (seed, victim, step, outcome, wall time, max weight
difference) and a summary line; exits 1 when any seed was not ok.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence

from benchmarks.fault_workloads import (
    max_weight_diff,
    plan_fault,
    restart_problems,
    run_fault_job,
)

JOB_TIMEOUT = 300.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.faults",
        description="SIGKILL a random worker at a random step of a real local job, once per "
                    "seed; check that a restart recovers it exactly.")
    parser.add_argument("--seeds", type=int, default=50, help="number of seeds (default 50)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--workers", type=int, default=3, help="workers per job (default 3)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per job (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1 or args.epochs < 1:
        parser.error("--seeds, --workers and --epochs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="disttrain-faults-") as tmp:
        reference = run_fault_job(f"{tmp}/reference", args.workers, args.epochs, fault=None,
                                  max_restarts=0, timeout=JOB_TIMEOUT)
        if reference.job.returncode != 0 or len(reference.results) != args.workers:
            print("the uninterrupted reference job failed:\n" + reference.job.report())
            return 1
        weights = reference.results[0]["weights"]
        print(f"reference: {args.workers} workers, {args.epochs} epochs, "
              f"{reference.job.seconds:.1f}s")
        print(f"{'seed':>5} {'victim':>6} {'step':>5}  {'wall':>7}  {'max diff':>9}  outcome")
        walls, diffs, failed = [], [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            fault = plan_fault(seed, args.workers, args.epochs)
            run = run_fault_job(f"{tmp}/seed-{seed}", args.workers, args.epochs, fault=fault,
                                max_restarts=1, timeout=JOB_TIMEOUT)
            problems = restart_problems(run, fault, args.workers, args.epochs, weights)
            diff = (max_weight_diff(run.results[0]["weights"], weights)
                    if 0 in run.results else float("nan"))
            walls.append(run.job.seconds)
            diffs.append(diff)
            if problems:
                failed.append(seed)
            print(f"{seed:>5} {'w' + str(fault[0]):>6} {fault[1]:>5}  {run.job.seconds:>6.1f}s  "
                  f"{diff:>9.2g}  {'; '.join(problems) or 'ok'}", flush=True)
    finite = [d for d in diffs if not math.isnan(d)]
    print(f"summary: {args.seeds - len(failed)}/{args.seeds} seeds recovered exactly "
          f"({args.workers} workers, {args.epochs} epochs); wall median "
          f"{statistics.median(walls):.1f}s, max {max(walls):.1f}s; max weight diff "
          f"{max(finite, default=float('nan')):.2g}"
          + (f"; failed seeds: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
