"""Parity check: a user's script trained a few steps in one process and on 2 workers, compared.

`python -m disttrain.check parity -- python train.py --epochs 5` runs the script
unchanged twice: once as one process, once as a 2-worker local cluster (the same
global batch: `batch_size` in a disttrain script is the global batch). In both,
`DISTTRAIN_PARITY_DIR` makes disttrain's `fit` hook add a callback that, after
`DISTTRAIN_PARITY_STEPS` training steps (or at the end of the first `fit` if it is
shorter), saves the model's weights and the weights it started from, then ends
the process. The check then compares: the workers with each other (bit for bit),
and the workers with the one process, variable by variable, relative to how far
training moved each variable. See `docs/parity.md`.

Example:

```
python -m disttrain.check parity --steps 5 -- python train.py
```
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from disttrain.keras_compat import parity_probe

TOLERANCE = 1e-3
"""Largest difference allowed, as a fraction of how far the variable moved in one process
(plus `FLOAT_FLOOR` of its magnitude): the all-reduce adds the replicas' gradients in
another order than one process's batch reduction, so float32 rounding differs by about
1e-7 of the values per step; a real difference (another batch order, per-replica
statistics, a loss counted per replica) moves the weights by a sizeable part of a step."""
FLOAT_FLOOR = 1e-6
WORKERS = 2
DEFAULT_STEPS = parity_probe.DEFAULT_STEPS
EXIT_MATCH, EXIT_DIFFER, EXIT_FAILED = 0, 1, 2


def compare(one: Mapping[str, Any], workers: Sequence[Mapping[str, Any]],
            tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Compares the captured weights: every worker with worker 0, and worker 0 with one process.

    Args:
        one: the one-process capture (`initial/<path>` and `final/<path>` arrays).
        workers: each worker's capture, rank order.
        tolerance: see `TOLERANCE`.

    Returns:
        `{"workers_identical": bool, "match": bool, "differing": [(path, relative
        difference), ...] in model order, "largest": the largest relative difference}`.

    Example:

    ```python
    compare(np.load("one.npz"), [np.load("worker-0.npz"), np.load("worker-1.npz")])["match"]
    ```
    """
    import numpy as np

    paths = [k[len("final/"):] for k in one if k.startswith("final/")]
    identical = all(np.array_equal(w[f"final/{p}"], workers[0][f"final/{p}"])
                    for w in workers[1:] for p in paths)
    differing, largest = [], 0.0
    for path in paths:
        want, got = one[f"final/{path}"], workers[0][f"final/{path}"]
        moved = float(np.max(np.abs(want - one[f"initial/{path}"]), initial=0.0))
        scale = moved + FLOAT_FLOOR * float(np.max(np.abs(want), initial=0.0))
        diff = float(np.max(np.abs(got - want), initial=0.0))
        relative = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
        largest = max(largest, relative)
        if relative > tolerance:
            differing.append((path, relative))
    return {"workers_identical": identical, "match": not differing and identical,
            "differing": differing, "largest": largest}


def main(argv: Sequence[str]) -> int:
    """`python -m disttrain.check parity [--steps N] [--timeout S] -- COMMAND...`."""
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.check parity",
        description="Train a few steps of a script in one process and on 2 local workers "
                    "(the same global batch) and compare the weights.")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps before the weights are compared "
                             f"(default {DEFAULT_STEPS})")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds for each run (default 600)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest difference as a fraction of each variable's movement "
                             f"(default {TOLERANCE:g})")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the training command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.steps < 1:
        parser.error("give --steps >= 1 and the training command after --, e.g. "
                     "python -m disttrain.check parity -- python train.py")
    with tempfile.TemporaryDirectory(prefix="disttrain-parity-") as directory:
        captures, failure = _run_both(command, directory, args.steps, args.timeout)
        if failure:
            print(failure, file=sys.stderr)
            return EXIT_FAILED
        import numpy as np

        one = dict(np.load(captures[0]))
        workers = [dict(np.load(path)) for path in captures[1:]]
        with open(captures[1].replace(".npz", ".json")) as f:
            found = json.load(f)
    result = compare(one, workers, args.tolerance)
    print(_report(command, args, result, found))
    return EXIT_MATCH if result["match"] else EXIT_DIFFER


def _run_both(command: list[str], directory: str, steps: int,
              timeout: float) -> tuple[list[str], str | None]:
    """Runs `command` in one process, then on `WORKERS` workers; the capture files or why not."""
    from disttrain.testing import run_cluster, worker_env

    one_dir, workers_dir = (os.path.join(directory, name) for name in ("one", "workers"))
    for path in (one_dir, workers_dir):
        os.makedirs(path)
    env = {parity_probe.ENV_STEPS: str(steps)}
    single = subprocess.run(command, env=worker_env({**env, parity_probe.ENV_DIR: one_dir}),
                            timeout=timeout, capture_output=True, text=True, check=False)
    captures = [os.path.join(one_dir, "worker-0.npz")]
    if not os.path.exists(captures[0]):
        return [], (f"parity: the one-process run ended (exit {single.returncode}) without "
                    "capturing weights. The script must call disttrain.strategy() (it installs "
                    "the hook) and train with model.fit. Its output:\n"
                    f"{single.stdout[-3000:]}{single.stderr[-5000:]}")
    run = run_cluster(command, WORKERS, env={**env, parity_probe.ENV_DIR: workers_dir},
                      timeout=timeout)
    captures += [os.path.join(workers_dir, f"worker-{rank}.npz") for rank in range(WORKERS)]
    if not all(os.path.exists(path) for path in captures[1:]):
        return [], (f"parity: the {WORKERS}-worker run did not reach a fit step on every "
                    f"worker:\n{run.report()[-8000:]}")
    return captures, None


def _report(command: list[str], args: argparse.Namespace, result: dict[str, Any],
            found: dict[str, Any]) -> str:
    lines = [f"parity of `{' '.join(command)}`: {found['steps']} training step(s), one process "
             f"against {WORKERS} local workers with the same global batch"]
    lines.append("workers bit-identical: " + ("yes" if result["workers_identical"] else
                                              "NO (workers diverged: a disttrain bug, "
                                              "please report it)"))
    if result["match"]:
        lines.append(f"MATCH: every variable within {args.tolerance:g} of its movement "
                     f"(largest {result['largest']:.2g})")
    else:
        lines.append(f"DIFFER: {len(result['differing'])} variable(s) beyond {args.tolerance:g} "
                     "of their movement; the first (model order):")
        lines += [f"  {path}: max difference {relative:.3g} of its movement"
                  for path, relative in result["differing"][:5]]
    if found["causes"]:
        lines.append("by design, in this model:")
        lines += [f"  - {cause}" for cause in found["causes"]]
    elif not result["match"]:
        lines.append("no by-design cause seen: check the input order (a global seed, "
                     "keras.utils.set_random_seed) and docs/parity.md")
    return "\n".join(lines)
