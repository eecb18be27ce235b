"""All-reduce latency and bandwidth of a strategy, measured and verified.

Shared by `python -m disttrain.check cluster` (the workers of a cluster) and
`python -m disttrain.check gpu` (the GPUs of one process). Each replica
contributes a float32 tensor filled with its replica id + 1; the sum must be
R·(R+1)/2 in every element for R replicas, so a collective that drops or doubles
a replica fails instead of being timed.

Example:

```python
rows = measure(disttrain.strategy(), [4096, 1 << 20], calls=5)
print(table(rows))
```
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_SIZES = (4 * 1024, 1024 * 1024, 16 * 1024 * 1024)
DEFAULT_CALLS = 5


def parse_size(text: str) -> int:
    """`"4K"`, `"1M"`, `"16M"` or a number of bytes, as bytes (a multiple of 4: float32)."""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit() or int(number) * scale < 4:
        raise ValueError(f"size {text!r} is not a number of bytes >= 4 such as 4096, 64K or 16M")
    return int(number) * scale // 4 * 4


def human_size(size: int) -> str:
    """`4096` -> `"4 KiB"`."""
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def measure(strategy, sizes: Sequence[int], calls: int = DEFAULT_CALLS) -> list[dict[str, Any]]:
    """Times a compiled SUM all-reduce of each size (bytes) over the strategy's replicas.

    Every replica of every worker must call this at the same point with the same
    arguments (it runs collectives). One untimed call per size comes first
    (tracing and the collective's setup), then `calls` timed ones.

    Args:
        strategy: a `tf.distribute` strategy (MultiWorkerMirrored, Mirrored, default).
        sizes: bytes per replica, multiples of 4.
        calls: timed calls per size; the median is reported.

    Returns:
        One dict per size: `bytes`, `median_ms`, `algbw_gbps` (bytes / time),
        `busbw_gbps` (algbw · 2(R−1)/R, the bytes each link carries in a ring,
        comparable to nccl-tests' figure; 0 for one replica).

    Raises:
        ValueError: the all-reduce returned a wrong sum (naming expected and got).
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    expected = replicas * (replicas + 1) / 2
    rows = []
    for size in sizes:
        elements = size // 4

        @tf.function
        def reduce_once(elements=elements):
            def replica_fn():
                context = tf.distribute.get_replica_context()
                mine = tf.cast(context.replica_id_in_sync_group + 1, tf.float32)
                total = context.all_reduce("SUM", tf.fill([elements], mine))
                return tf.stack([total[0], total[-1]])

            return strategy.run(replica_fn)

        def call() -> float:
            started = time.perf_counter()
            results = [r.numpy() for r in strategy.experimental_local_results(reduce_once())]
            seconds = time.perf_counter() - started
            for result in results:
                if not all(float(v) == expected for v in result):
                    raise ValueError(
                        f"all-reduce of {human_size(size)} over {replicas} replicas summed to "
                        f"{result.tolist()} (first, last element), expected {expected:g}: a "
                        "replica was dropped or counted twice")
            return seconds

        call()
        seconds = statistics.median(call() for _ in range(calls))
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "median_ms": seconds * 1e3, "algbw_gbps": algbw,
                     "busbw_gbps": algbw * 2 * (replicas - 1) / replicas})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows of `measure` as aligned text lines."""
    lines = [f"{'size':>10} {'median ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    lines += [f"{human_size(r['bytes']):>10} {r['median_ms']:>10.2f} {r['algbw_gbps']:>11.3f} "
              f"{r['busbw_gbps']:>11.3f}" for r in rows]
    return lines
