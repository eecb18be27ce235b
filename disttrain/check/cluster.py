"""Cluster check: what disttrain derived, an all-reduce timed, the checkpoint URL probed.

`python -m disttrain.check cluster [--url URL]`, run as the training command
under any launcher (`launch.local`, `srun`, the pods of `launch.k8s`, `mpirun`),
checks the items below in order on every task and stops at the first that fails:

- `cluster`: the cluster derived from TF_CONFIG or the launcher (this task's own line);
- `strategy`: the strategy created over it, and the run id the tasks agreed on;
- `versions`: Python, TensorFlow, Keras and disttrain, identical on every task;
- `all-reduce`: a compiled all-reduce between all tasks at a few sizes, verified and
  timed (latency, bandwidth);
- `url-write`: the chief writes a probe file `.disttrain-probe-<random>` into `--url`
  (never over an existing file);
- `url-read`: every task reads it back, byte for byte (a path only the chief can see,
  e.g. a local disk instead of a shared volume, fails here naming the task);
- `url-cleanup`: the chief removes the probe (and the directories the probe created).

The chief prints the report; every task prints its own `cluster` line and the
verdict. Exit 0 when every item passed, `EXIT_FAILED` (1) on every task naming the
first failing item (`FAILED: <item>: <why>`), 2 on bad arguments. See
`docs/launchers.md` ("Checking a cluster").

Example:

```
python -m launch.local --workers 2 -- python -m disttrain.check cluster --url gs://bucket/run
srun -n 4 python -m disttrain.check cluster --url /shared/checkpoints
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

from disttrain.check import all_reduce
from disttrain.cluster import ENV_TF_CONFIG, Cluster

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ITEMS = ("cluster", "strategy", "versions", "all-reduce", "url-write", "url-read",
         "url-cleanup")


class ItemFailed(Exception):
    """The item `item` failed; the message says why."""

    def __init__(self, item: str, message: str):
        super().__init__(f"{item}: {message}")
        self.item = item


def main(argv: Sequence[str]) -> int:
    """`python -m disttrain.check cluster [--url URL] [--sizes 4K 1M 16M] [--calls N]`."""
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.check cluster",
        description="Run on every task of a cluster (under any launcher): prints what disttrain "
                    "derived, times an all-reduce between all tasks and probes the checkpoint "
                    "URL; exits 1 naming the first failing item.")
    parser.add_argument("--url", help="checkpoint directory (path or fsspec URL) to probe: the "
                                      "chief writes a file, every task reads it; default: skip")
    parser.add_argument("--sizes", nargs="+", type=_size, default=list(all_reduce.DEFAULT_SIZES),
                        help="all-reduce sizes per replica (default 4K 1M 16M)")
    parser.add_argument("--calls", type=int, default=all_reduce.DEFAULT_CALLS,
                        help=f"timed all-reduces per size (default {all_reduce.DEFAULT_CALLS})")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be >= 1")
    try:
        _check(args)
    except ItemFailed as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


def _size(text: str) -> int:
    try:
        return all_reduce.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _item(item: str, action: Callable[[], Any]) -> Any:
    """Runs one item; any failure becomes `ItemFailed(item, ...)`."""
    try:
        return action()
    except Exception as e:  # noqa: BLE001 - every failure is reported, naming its item
        raise ItemFailed(item, f"{type(e).__name__}: {e}") from e


def _check(args: argparse.Namespace) -> None:
    cluster = _item("cluster", Cluster.from_env)
    me = cluster.label if cluster.is_multi_worker else "the only task"
    role = "chief" if cluster.is_chief else "not chief"
    chief = cluster.training_addresses[0] if cluster.is_multi_worker else "-"
    source = cluster.source
    if source == ENV_TF_CONFIG and not os.environ.get(ENV_TF_CONFIG, "").strip():
        source = "no TF_CONFIG and no multi-task launcher"
    print(f"cluster     {source}: {cluster.num_workers} training task(s); this task "
          f"{me} (rank {cluster.worker_rank}, {role}); chief {chief}", flush=True)
    strategy, run_id = _item("strategy", _strategy)
    from disttrain import coordination

    coord = coordination.get()

    def say(line: str) -> None:
        if cluster.is_chief:
            print(line, flush=True)

    say(f"strategy    {type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s)")
    say(f"run id      {run_id}")
    say(f"versions    {_item('versions', lambda: _same_versions(coord))} (every task)")
    rows = _item("all-reduce", lambda: all_reduce.measure(strategy, args.sizes, args.calls))
    say(f"all-reduce  between {strategy.num_replicas_in_sync} replica(s), measured on the chief:")
    for line in all_reduce.table(rows):
        say(f"            {line}")
    if args.url:
        say(f"url         {_probe_url(coord, args.url)}")
    else:
        say("url         not probed (give --url)")
    print(f"OK: {len(ITEMS) if args.url else len(ITEMS) - 3} items passed", flush=True)


def _strategy() -> tuple[Any, str]:
    import disttrain
    from disttrain import coordination

    created = disttrain.strategy()
    return created, coordination.get().run_id()


def versions() -> dict[str, str]:
    """Python, TensorFlow, Keras and disttrain versions of this process."""
    import keras
    import tensorflow as tf

    import disttrain

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "disttrain": disttrain.__version__}


def _same_versions(coord) -> str:
    mine = versions()
    every = [json.loads(v) for v in coord.gather("check.versions", json.dumps(mine))]
    differing = [f"{coord.cluster.label_of_rank(rank)} has {k} {v[k]}" for rank, v in enumerate(every)
                 for k in mine if v[k] != every[0][k]]
    if differing:
        raise ValueError(f"tasks run different versions: the chief has "
                         f"{_format(every[0])}, but {'; '.join(differing)}. Fix: install the "
                         "same image or environment on every node")
    return _format(mine)


def _format(found: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in found.items())


def _probe_url(coord, url: str) -> str:
    """The chief writes a probe file into `url`, every task reads it, the chief removes it
    (and any directory it created), also when a read failed."""
    from disttrain.errors import StorageError
    from disttrain.storage import (PROBE_PREFIX, atomic_write_bytes, exists, join, read_bytes,
                                   remove)

    def write() -> dict[str, Any]:
        probe = join(url, f"{PROBE_PREFIX}{secrets.token_hex(8)}")
        if exists(probe):
            raise StorageError(f"{probe!r} exists already; the check never overwrites a file. "
                               "Fix: run the check again (the name is random)")
        created = _missing_local_dirs(url)
        content = f"disttrain cluster check {secrets.token_hex(16)}\n"
        atomic_write_bytes(probe, content.encode())
        return {"probe": probe, "content": content, "created": created}

    written = _item("url-write",
                    lambda: coord.run_on_chief("check.url-write", write, StorageError))
    probe = written["probe"]
    error = None
    try:
        found = read_bytes(probe).decode(errors="replace")
        if found != written["content"]:
            raise StorageError(f"{probe!r} holds {found[:80]!r}, not what the chief wrote: this "
                               f"task sees another file under the same name. Fix: give every "
                               "task the same shared storage")
    except Exception as e:  # noqa: BLE001 - shared with every task below
        error = e

    def cleanup() -> None:
        remove(probe)
        for directory in written["created"]:
            os.rmdir(directory)

    read_failure = None
    try:
        _item("url-read", lambda: coord.raise_if_any("check.url-read", error, StorageError))
    except ItemFailed as e:
        read_failure = e
    try:
        _item("url-cleanup",
              lambda: coord.run_on_chief("check.url-cleanup", cleanup, StorageError))
    except ItemFailed as e:
        if read_failure is None:
            raise
        print(f"also {e}", file=sys.stderr, flush=True)
    if read_failure is not None:
        raise read_failure
    return (f"{url}: the chief wrote {probe.rsplit('/', 1)[-1]}, all {coord.num_workers} "
            "task(s) read it back, the chief removed it")


def _missing_local_dirs(url: str) -> list[str]:
    """The directories of a local `url` that do not exist yet, deepest first (the probe's
    write creates them; the cleanup removes them again). Object stores have none."""
    from fsspec.implementations.local import LocalFileSystem

    from disttrain.storage import url_to_fs

    fs, path = url_to_fs(url)
    missing: list[str] = []
    if isinstance(fs, LocalFileSystem):
        while path and not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
    return missing
