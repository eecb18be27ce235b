"""Worker functions for coordination and strategy tests on real clusters.

The `*_over` functions take a coordinator, so that the same protocol steps also
run on ranks simulated in threads over an in-process transport.
"""

from __future__ import annotations

import os
import time

from tests.support.models import dense_model


def exchanges() -> dict:
    """Every coordination primitive once; returns what this worker saw."""
    from disttrain import coordination
    from disttrain.distribute import strategy

    strategy()
    return exchanges_over(coordination.get())


def exchanges_over(coord) -> dict:
    """Every primitive of `coord` once; returns what this worker saw."""
    from disttrain.errors import CoordinationError, StorageError

    rank = coord.rank
    seen = {
        "rank": rank,
        "num_workers": coord.num_workers,
        "any": coord.any(rank == 1, "t.any"),
        "all": coord.all(rank == 1, "t.all"),
        "all_true": coord.all(True, "t.all_true"),
        "gather": coord.gather("t.gather", f"value-{rank}"),
        "broadcast": coord.broadcast(f"from-{rank}" if coord.is_chief else None, "t.bcast"),
        "run_id": coord.run_id(),
        "chief_result": coord.run_on_chief("t.result", lambda: {"rank": rank}),
    }
    coord.barrier("t.barrier")
    for i in range(150):
        coord.any(False, f"t.many-{i}")
    coord.barrier("t.after_many")
    seen["stored_keys"] = _stored_exchange_keys(coord, [0, 127, coord._seq - 1])
    try:
        coord.raise_if_any("t.error", ValueError("disk full") if rank == 1 else None,
                           StorageError)
    except StorageError as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    try:
        coord.run_on_chief("t.chief", lambda: 1 / 0)
    except CoordinationError as e:
        seen["chief_error"] = str(e)
    return seen


def _stored_exchange_keys(coord, seqs: list[int]) -> list[list[bool]]:
    """For each exchange number, whether each rank's key is still in the key-value store.

    A read of a stored key from the chief's service can take more than a
    millisecond on a loaded machine, so each read may wait a little.
    """
    return [[coord.transport.get(coord._key(seq, rank), 0.2) is not None
             for rank in range(coord.num_workers)] for seq in seqs]


def peer_exits(exit_rank: int) -> dict:
    """`exit_rank` exits after a barrier; the others must get a CoordinationError, not hang.

    (When the chief exits, a survivor may still be reading the barrier from the chief's
    key-value store, so the error can come from the barrier or from the vote.)
    """
    from disttrain import coordination
    from disttrain.errors import CoordinationError
    from disttrain.distribute import strategy

    strategy()
    coord = coordination.get()
    start = time.monotonic()
    try:
        coord.barrier("t.start")
        if coord.rank == exit_rank:
            os._exit(7)
        coord.any(False, "t.vote")
    except CoordinationError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def diverge() -> dict:
    """Rank 0 and rank 1 reach different call sites."""
    from disttrain import coordination
    from disttrain.distribute import strategy

    strategy()
    return diverge_over(coordination.get())


def diverge_over(coord) -> dict:
    """Rank 0 and rank 1 of `coord`'s group reach different call sites."""
    from disttrain.errors import CoordinationError

    try:
        coord.any(True, "t.left" if coord.rank == 0 else "t.right", timeout=30)
    except CoordinationError as e:
        return {"error": str(e)}
    return {"error": None}


def stuck_peer() -> dict:
    """Rank 1 is alive but late; rank 0 waits with a 2 s limit."""
    from disttrain import coordination
    from disttrain.errors import CoordinationError
    from disttrain.distribute import strategy

    strategy()
    coord = coordination.get()
    coord.barrier("t.start")
    if coord.rank == 1:
        time.sleep(6)
        return {"error": None, "seconds": 0.0}
    start = time.monotonic()
    try:
        coord.any(False, "t.vote", timeout=2)
    except CoordinationError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def strategy_facts() -> dict:
    """What disttrain.strategy() gives on this task."""
    from disttrain import keras_compat
    from disttrain.errors import StrategyError
    from disttrain.distribute import strategy

    first = strategy()
    facts = {
        "type": type(first).__name__,
        "same_object": strategy() is first,
        "replicas": first.num_replicas_in_sync,
        "fixes": sorted(keras_compat.applied()),
    }
    try:
        strategy(timeout_seconds=30)
    except StrategyError as e:
        facts["different_options"] = str(e)
    return facts


def hang_with_child() -> dict:
    """Starts a grandchild, then hangs: the harness must kill both by group."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(600)
    return {}


def stalled_peer(how: str) -> dict:
    """Rank 1 stops taking part in training after 5 steps: `how` is "loop" (alive, stuck in
    a callback's endless loop) or "sigstop" (frozen). Rank 0 reports how fit failed."""
    import os
    import signal
    import subprocess

    import keras

    from disttrain import coordination
    from disttrain.distribute import strategy

    with strategy().scope():
        model = dense_model(4)
        model.compile("sgd", "mse")
    rank = coordination.get().rank

    class Stall(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if rank == 1 and batch == 5:
                if how == "sigstop":
                    # Thawed by death 30 s later, so that the cluster ends by itself.
                    subprocess.Popen(["sh", "-c", f"sleep 30; kill -9 {os.getpid()}"])
                    os.kill(os.getpid(), signal.SIGSTOP)
                while True:
                    time.sleep(0.05)

    import numpy as np

    x = np.ones((64 * 1000, 4), "float32")
    start = time.monotonic()
    try:
        model.fit(x, x[:, :1], batch_size=64, epochs=1, verbose=0, callbacks=[Stall()])
    except Exception as e:  # noqa: BLE001 - the error is the result
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def sigterm_self() -> dict:
    """Rank 1 sends itself SIGTERM after the strategy exists; it must die of it."""
    import os
    import signal

    from disttrain import coordination
    from disttrain.distribute import strategy

    strategy()
    if coordination.get().rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
        return {"survived": True}
    return {"survived": None}
