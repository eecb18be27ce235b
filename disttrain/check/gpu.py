"""GPU check: one process over every visible GPU, run as is on a machine with 2 or more.

`python -m disttrain.check gpu` checks, in order, and prints a table:

- `replicas`: `disttrain.strategy()` (its default `local_devices="all"`) gives a
  `MirroredStrategy` with one replica per visible GPU;
- `all-reduce`: a verified all-reduce between the GPUs (MirroredStrategy's default on
  GPUs: NCCL), latency and bandwidth at a few sizes;
- `parity`: a small model trained `--steps` steps with `fit` over every GPU (2 on a
  2-GPU machine) and on one device, from the same initial weights on the same global batches (SGD, unshuffled);
  every variable must be within `--tolerance` of its movement (the measure of
  `python -m disttrain.check parity`).

Exits 0 when all passed, 1 naming the first failed item, 2 on bad arguments and
`EXIT_NO_GPUS` (4), saying so, when TensorFlow sees fewer than 2 GPUs (nothing is run).
`--cpu-stand-in` runs the same items on 2 logical CPUs, to test this check itself
where no GPU is (NCCL is then not involved).

Example:

```
python -m disttrain.check gpu
```
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from disttrain.check import all_reduce, parity

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPUS = 0, 1, 2, 4
MIN_GPUS = 2
BATCH_PER_REPLICA = 32
DEFAULT_STEPS = 10


def main(argv: Sequence[str]) -> int:
    """`python -m disttrain.check gpu [--sizes ...] [--steps N] [--tolerance T] [--cpu-stand-in]`."""
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.check gpu",
        description="On a machine with 2+ GPUs: the replica count of disttrain.strategy(), the "
                    "all-reduce bandwidth between the GPUs, and a 2-GPU fit against one device.")
    parser.add_argument("--sizes", nargs="+", default=["4K", "1M", "64M"],
                        help="all-reduce sizes per GPU (default 4K 1M 64M)")
    parser.add_argument("--calls", type=int, default=all_reduce.DEFAULT_CALLS,
                        help=f"timed all-reduces per size (default {all_reduce.DEFAULT_CALLS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps of the parity fit (default {DEFAULT_STEPS})")
    parser.add_argument("--tolerance", type=float, default=parity.TOLERANCE,
                        help=f"largest weight difference as a fraction of each variable's "
                             f"movement (default {parity.TOLERANCE:g})")
    parser.add_argument("--cpu-stand-in", action="store_true",
                        help="run on 2 logical CPUs instead (tests this check without GPUs)")
    args = parser.parse_args(argv)
    try:
        sizes = [all_reduce.parse_size(s) for s in args.sizes]
    except ValueError as e:
        parser.error(str(e))
    if args.calls < 1 or args.steps < 1:
        parser.error("--calls and --steps must be >= 1")
    import tensorflow as tf

    if args.cpu_stand_in:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * MIN_GPUS)
        devices: list[str] = [f"/cpu:{i}" for i in range(MIN_GPUS)]
    else:
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) < MIN_GPUS:
            print(f"gpu: NOT RUN: TensorFlow sees {len(gpus)} GPU(s) (built with CUDA: "
                  f"{tf.test.is_built_with_cuda()}, CUDA_VISIBLE_DEVICES="
                  f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); this check needs at "
                  f"least {MIN_GPUS}. Fix: run it on a machine with {MIN_GPUS} or more GPUs and "
                  "a CUDA build of TensorFlow (pip install tensorflow[and-cuda]).",
                  file=sys.stderr, flush=True)
            return EXIT_NO_GPUS
        devices = [f"/gpu:{i}" for i in range(len(gpus))]
    failed = _run(devices, "all" if not args.cpu_stand_in else devices, sizes, args)
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print("OK: replicas, all-reduce and parity passed", flush=True)
    return EXIT_OK


def _run(devices: list[str], local_devices: Any, sizes: list[int],
         args: argparse.Namespace) -> str | None:
    """Runs the items, printing a table row each; the first failure, or None."""
    import disttrain

    print(f"{'item':<11} result", flush=True)
    strategy = disttrain.strategy(local_devices=local_devices)
    replicas = strategy.num_replicas_in_sync
    line = (f"{type(strategy).__name__} over {len(devices)} device(s) "
            f"({', '.join(devices)}): {replicas} replica(s)")
    print(f"{'replicas':<11} {line}", flush=True)
    if replicas != len(devices):
        return f"replicas: {line}, expected {len(devices)}"
    try:
        rows = all_reduce.measure(strategy, sizes, args.calls)
    except Exception as e:  # noqa: BLE001 - the table names the failing item
        return f"all-reduce: {type(e).__name__}: {e}"
    for i, text in enumerate(all_reduce.table(rows)):
        print(f"{'all-reduce' if i == 0 else '':<11} {text}", flush=True)
    result = fit_parity(strategy, args.steps, args.tolerance)
    line = (f"{args.steps} steps of fit, global batch {BATCH_PER_REPLICA * replicas}, "
            f"{replicas} devices against one: largest difference {result['largest']:.2g} of a "
            f"variable's movement (tolerance {args.tolerance:g})")
    print(f"{'parity':<11} {line}", flush=True)
    if not result["match"]:
        first, relative = result["differing"][0]
        return f"parity: {line}; first differing variable {first} ({relative:.3g})"
    return None


def fit_parity(strategy, steps: int, tolerance: float = parity.TOLERANCE) -> dict[str, Any]:
    """Trains a small model `steps` steps under `strategy` and on one device; compares.

    The global batch is `BATCH_PER_REPLICA` per replica of `strategy`. Both start from the same weights and see the same global batches in the same
    order (SGD, no shuffling), so they differ only by float rounding.

    Returns:
        `parity.compare`'s result (`match`, `largest`, `differing`).

    Example:

    ```python
    fit_parity(tf.distribute.MirroredStrategy(["/gpu:0", "/gpu:1"]), steps=10)["match"]
    ```
    """
    import keras
    import numpy as np

    batch = BATCH_PER_REPLICA * strategy.num_replicas_in_sync
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 16)).astype("float32")
    y = (x @ rng.normal(size=(16, 1)) + 0.1 * rng.normal(size=(len(x), 1))).astype("float32")

    def build():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    one = build()
    initial = one.get_weights()
    with strategy.scope():
        many = build()
    many.set_weights(initial)
    paths = [v.path for v in one.weights]  # `many`'s are numbered apart (sequential_1/...)
    captures = []
    for model in (one, many):
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        captures.append({**{f"initial/{p}": w for p, w in zip(paths, initial)},
                         **{f"final/{p}": w for p, w in zip(paths, model.get_weights())}})
    return parity.compare(captures[0], captures[1:], tolerance)
