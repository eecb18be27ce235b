"""disttrain benchmarks: side-by-side measurements on real localhost clusters.

Prints a table of ratios measured in one run (machines are noisy; compare the
ratios, not absolute times across runs).

    python -m benchmarks.bench [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks import workers
from tests.harness import run_cluster


def _median_over_workers(run, key: str) -> float:
    run.assert_ok()
    values = sorted(r[key] for r in run.results)
    return values[len(values) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    n = args.workers
    rows = []

    votes = run_cluster(workers.vote_latency, n, timeout=300)
    vote = _median_over_workers(votes, "vote_ms")
    reduce_ = _median_over_workers(votes, "all_reduce_ms")
    rows.append((f"vote, {n} workers (coordination.any)", f"{vote:.2f} ms",
                 f"tf.function all-reduce: {reduce_:.2f} ms", f"{vote / reduce_:.2f}x"))

    synced = run_cluster(workers.batchnorm_step_time, n, kwargs={"skip_bn_fix": False},
                         timeout=400)
    drifting = run_cluster(workers.batchnorm_step_time, n, kwargs={"skip_bn_fix": True},
                           timeout=400)
    with_fix = _median_over_workers(synced, "step_ms")
    without = _median_over_workers(drifting, "step_ms")
    rows.append((f"train step, 4 BN layers, {n} workers, BN stats synced", f"{with_fix:.2f} ms",
                 f"unsynced (stock Keras 3): {without:.2f} ms", f"{with_fix / without:.2f}x"))

    with tempfile.TemporaryDirectory() as tmp:
        saves = run_cluster(workers.checkpoint_save_time, 1, kwargs={"directory": tmp},
                            timeout=300).assert_ok().results[0]
    ours, theirs = saves["disttrain_save_ms"], saves["keras_save_ms"]
    rows.append(("ModelCheckpoint save, 4.7M params, local disk (atomic + manifest)",
                 f"{ours:.1f} ms", f"keras.callbacks.ModelCheckpoint: {theirs:.1f} ms",
                 f"{ours / theirs:.2f}x"))

    header = ("measurement", "disttrain", "baseline", "ratio")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = " | ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print(f"\n(cpu cores: {os.cpu_count()}, python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
