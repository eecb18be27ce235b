"""Fault injection over many seeds: one kind of fault at a random moment, check the outcome.

Usage:

    python -m benchmarks.faults --kind all --seeds 20
    python -m benchmarks.faults --kind worker-stop disk-full --seeds 5

First one uninterrupted job gives the reference weights (and the number of
renames the chief makes into the backup and checkpoint directories). Then, for
each kind and seed, `random.Random(seed)` picks a victim rank and a moment
(`benchmarks.fault_workloads.plan_fault`) and one real job runs under
`python -m launch.local` (`fault_train`: `BackupAndRestore(save_freq="epoch")`
and a ModelCheckpoint per epoch). The kinds (`--kind`, default worker-kill):

- worker-kill: a random worker SIGKILLs itself after a random step;
- worker-stop: a random worker SIGSTOPs itself after a random step, frozen for
  good (TensorFlow's heartbeat must notice it);
- chief-kill-commit / chief-kill-backup: the chief SIGKILLs itself just before
  or just after a random one of the renames of its ModelCheckpoint /
  BackupAndRestore commits;
- disk-full: the chief fills the checkpoint disk (a 1 MiB tmpfs; needs root)
  after a random step;
- network-cut: a random worker is cut off the network after a random step: an
  iptables rule drops every packet its process sends (matched by a cgroup it
  joined at start; needs root). Besides recovering like worker-kill, every
  worker's fit must raise by itself within `CUT_NOTICED_WITHIN` seconds of the
  cut; the row notes each worker's seconds.
- storage-kill: the checkpoints and backups go to gs:// on a local GCS emulator
  (`workloads.gcs_server`, objects on disk); the chief SIGKILLs it 0-0.4 s
  into a random epoch's saves and the driver restarts it on the same port and
  directory 0.5-40 s later (gcsfs gives up on a call 31-36 s after its first
  refused try). `--storage-down 45` keeps it down 45 s on every seed instead,
  past those retries: the job must then restart (the two-attempt path).
- link-down: the job runs as the pods of a generated JobSet, each in a network
  namespace of its own on a bridge (`run_pod_fault_job`; needs root and
  `ip netns`); a random pod's link is set down from the bridge's side after a
  random step and the driver, as JobSet's failure policy, restarts every pod
  once. Checked as network-cut (every worker noticed within
  `CUT_NOTICED_WITHIN` s, recovered exactly, against the same `launch.local`
  reference), and no namespace, link or /etc/netns entry is left
  (`link_down_problems`).

The first four and network-cut run with `--max-restarts 1`: a seed is ok when the job exits 0
after exactly 2 attempts, every worker resumed where the last committed backup
says and ends with weights within 1e-5 of the reference, and the checkpoint and
backup directories hold no temp file, no damaged commit and no visible
unlisted checkpoint (`restart_problems`). disk-full runs without restarts: ok
when the job fails, every worker printed the same disttrain error naming the
full disk and a fix, and every checkpoint saved before the disk filled is
listed and readable with nothing else visible (`disk_full_problems`).
storage-kill runs with `--max-restarts 1`: ok when the job ends with the
reference weights after one attempt (retried) or two (every worker of attempt
0 printed a StorageError naming the gs:// URL), or fails with that error on
every worker, and, checked through the restarted emulator, every manifest names
existing objects of the listed sizes and sha256 (`storage_kill_problems`).

Prints one row per seed (seed, fault, outcome, wall time, seconds from the
fault to the restarted attempt's start, weight difference) and a table per
kind; exits 1 when any seed was not ok.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence

from benchmarks.fault_workloads import (
    CUT_NOTICED_WITHIN,
    GCSFS_GIVES_UP_AFTER,
    STORAGE_DOWN_PAST_RETRIES,
    cgroup2_root,
    detection_seconds,
    disk_full_problems,
    link_down_problems,
    emulator_broke,
    max_weight_diff,
    network_cut_problems,
    plan_fault,
    restart_problems,
    restart_seconds,
    run_fault_job,
    run_pod_fault_job,
    storage_kill_problems,
    with_outage,
)
from workloads.fault_training import (
    DISK_FULL,
    KINDS,
    LINK_DOWN,
    NETWORK_CUT,
    STORAGE_KILL,
    WORKER_KILL,
)
from workloads.pod_network import netns_unavailable

JOB_TIMEOUT = 300.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.faults",
        description="Strike one kind of fault at a random moment of a real local job, once "
                    "per seed; check that the job recovers exactly or fails clearly.")
    parser.add_argument("--kind", nargs="+", default=[WORKER_KILL], choices=[*KINDS, "all"],
                        help="the faults, in turn (default worker-kill); all: every kind")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per kind (default 20)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="workers per job (default 2)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per job (default 4)")
    parser.add_argument("--storage-down", type=float, default=None, metavar="SECONDS",
                        help="storage-kill: keep the emulator down this long on every seed "
                             "instead of the seed's 0.5-40 s; past gcsfs's retries (about "
                             f"{GCSFS_GIVES_UP_AFTER:g} s) the job must restart "
                             f"(e.g. {STORAGE_DOWN_PAST_RETRIES:g})")
    return parser


def _row(seed: int, fault: str, wall: float, restart: float | None, diff: float,
         outcome: str) -> str:
    restarted = "-" if restart is None else f"{restart:.1f}s"
    return (f"{seed:>5}  {fault:<30} {wall:>6.1f}s  {restarted:>8}  {diff:>9.2g}  {outcome}")


def run_kind(kind: str, args: argparse.Namespace, tmp: str, reference: list,
             renames: dict[str, int]) -> dict:
    """Runs every seed of `kind`, printing a row each; returns its summary."""
    print(f"\n{kind}: {KINDS[kind]}")
    print(f"{'seed':>5}  {'fault':<30} {'wall':>7}  {'restart':>8}  {'max diff':>9}  outcome")
    walls, restarts, diffs, failed, detections = [], [], [], [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        fault = plan_fault(seed, args.workers, args.epochs, kind, renames)
        if kind == STORAGE_KILL and args.storage_down is not None:
            fault = with_outage(fault, args.storage_down)
        runner = run_pod_fault_job if kind == LINK_DOWN else run_fault_job
        run = runner(f"{tmp}/{kind}-{seed}", args.workers, args.epochs, fault=fault,
                     max_restarts=0 if kind == DISK_FULL else 1, timeout=JOB_TIMEOUT)
        if kind == DISK_FULL:
            problems = disk_full_problems(run, fault, args.workers)
        elif kind == STORAGE_KILL:
            problems = storage_kill_problems(run, fault, args.workers, args.epochs, reference)
        else:
            problems = restart_problems(run, fault, args.workers, args.epochs, reference)
        note = ""
        if kind == LINK_DOWN:
            problems += link_down_problems(run, args.workers, CUT_NOTICED_WITHIN)
        elif kind == NETWORK_CUT:
            problems += network_cut_problems(run, args.workers, CUT_NOTICED_WITHIN)
        if kind in (NETWORK_CUT, LINK_DOWN):
            noticed = detection_seconds(run)
            detections.extend(noticed.values())
            note = " (noticed: " + " ".join(f"w{r} {s:.1f}s" for r, s in
                                           sorted(noticed.items())) + ")"
            if run.cut_at is not None and run.fault is not None:
                note = note[:-1] + f"; cut {run.cut_at - run.fault['time']:.2f}s after asked)"
        diff = (max_weight_diff(run.results[0]["weights"], reference)
                if 0 in run.results else float("nan"))
        restart = restart_seconds(run)
        walls.append(run.job.seconds)
        diffs.append(diff)
        if restart is not None:
            restarts.append(restart)
        if problems:
            failed.append(seed)
        ok = "ok"
        if kind == STORAGE_KILL and emulator_broke(run.storage):
            ok = f"ok for disttrain (clear StorageError); the emulator's fault: {run.storage[0]}"
        elif kind == STORAGE_KILL and run.ended_while_down:
            ok += " (the job ended before the restart: its last writes preceded the kill)"
        elif kind == STORAGE_KILL:
            ok += " (retried)" if "1 attempt(s)" in run.job.stderr else " (restarted)"
        print(_row(seed, fault.describe(), run.job.seconds, restart, diff,
                   ("; ".join(problems) or ok) + note), flush=True)
    finite = [d for d in diffs if not math.isnan(d)]
    return {"kind": kind, "ok": args.seeds - len(failed), "seeds": args.seeds,
            "wall_median": statistics.median(walls), "wall_max": max(walls),
            "restart_max": max(restarts, default=None),
            "diff_max": max(finite, default=float("nan")), "failed": failed,
            "noticed_max": max(detections, default=None)}


def summary_table(summaries: list[dict], workers: int, epochs: int) -> str:
    """The per-kind table: ok/seeds, wall median and max, slowest restart, max weight diff."""
    lines = [f"summary ({workers} workers, {epochs} epochs):",
             f"{'kind':<18} {'ok':>7}  {'wall median':>11}  {'wall max':>8}  "
             f"{'restart max':>11}  {'max diff':>8}  failed seeds"]
    for s in summaries:
        restart = "-" if s["restart_max"] is None else f"{s['restart_max']:.1f}s"
        lines.append(f"{s['kind']:<18} {s['ok']:>3}/{s['seeds']:<3}  {s['wall_median']:>10.1f}s  "
                     f"{s['wall_max']:>7.1f}s  {restart:>11}  {s['diff_max']:>8.2g}  "
                     f"{s['failed'] or '-'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1 or args.epochs < 1:
        parser.error("--seeds, --workers and --epochs must be at least 1")
    if args.storage_down is not None and args.storage_down < 0:
        parser.error(f"--storage-down must be at least 0 seconds, got {args.storage_down:g}")
    kinds = list(KINDS) if "all" in args.kind else list(dict.fromkeys(args.kind))
    if DISK_FULL in kinds and os.geteuid() != 0:
        parser.error("--kind disk-full mounts a tmpfs: run as root, or pick another kind")
    if NETWORK_CUT in kinds and (os.geteuid() != 0 or cgroup2_root() is None):
        parser.error("--kind network-cut makes a cgroup v2 and an iptables rule: run as root "
                     "on a host with cgroup2 mounted, or pick another kind")
    unavailable = netns_unavailable() if LINK_DOWN in kinds else None
    if unavailable:
        parser.error(f"--kind link-down runs the workers as simulated pods: {unavailable}; "
                     "pick another kind")
    with tempfile.TemporaryDirectory(prefix="disttrain-faults-") as tmp:
        reference = run_fault_job(f"{tmp}/reference", args.workers, args.epochs, fault=None,
                                  max_restarts=0, timeout=JOB_TIMEOUT)
        if reference.job.returncode != 0 or len(reference.results) != args.workers:
            print("the uninterrupted reference job failed:\n" + reference.job.report())
            return 1
        print(f"reference: {args.workers} workers, {args.epochs} epochs, "
              f"{reference.job.seconds:.1f}s, chief renames {reference.renames}", flush=True)
        summaries = [run_kind(kind, args, tmp, reference.results[0]["weights"],
                              reference.renames) for kind in kinds]
    print("\n" + summary_table(summaries, args.workers, args.epochs))
    for s in summaries:
        if s["noticed_max"] is not None:
            print(f"{s['kind']}: every worker noticed within {s['noticed_max']:.1f}s of the "
                  f"fault (bound {CUT_NOTICED_WITHIN:g}s)")
    return 1 if any(s["failed"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
