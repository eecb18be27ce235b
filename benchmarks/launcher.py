"""Launcher: `launch.local` vs bare subprocesses with TF_CONFIG (`disttrain.testing.run_cluster`).

Time to first training step: from starting the launcher (or the processes) to the
end of the first training step of a small model on every worker. Teardown: a
worker exits with code 3 right after its first step while its peer trains on;
the time from that exit until everything has ended (`launch.local`, default
options, stops the peer: SIGTERM, SIGKILL after `--grace`; bare processes end
when the peer notices by itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import Goal, Row, Stat, ratio_row
from benchmarks.settings import Settings
from disttrain.testing import function_command, run_cluster, worker_env

FAILED_EXIT = 3


def probe(marker: str, fail_rank: int) -> dict[str, Any]:
    """A worker: train a small model; note the time when step 1 ends, then exit
    (`fail_rank` exits with FAILED_EXIT, the others keep training when one fails)."""
    import keras
    import numpy as np

    import disttrain
    from disttrain import coordination

    strategy = disttrain.strategy()
    rank = coordination.get().rank
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                Path(f"{marker}.{rank}").write_text(repr(time.time()))
                if rank == fail_rank:
                    os._exit(FAILED_EXIT)
                if fail_rank < 0:
                    self.model.stop_training = True

    x = np.zeros((64 * 2000, 8), "float32")
    model.fit(x, x[:, :1], batch_size=64, epochs=1, verbose=0, callbacks=[FirstStep()])
    return {}


def _launch_local(kwargs: dict[str, Any], workers: int) -> None:
    command = [sys.executable, "-m", "launch.local", "--workers", str(workers), "--",
               *function_command(probe, kwargs)]
    subprocess.run(command, env=worker_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300, check=False)


def _bare(kwargs: dict[str, Any], workers: int) -> None:
    run_cluster(probe, workers, kwargs=kwargs, timeout=300)


def _timed(start_all, marker: str, workers: int, fail_rank: int) -> tuple[float, float]:
    """Seconds to the first step on every worker, and from the failure to the end."""
    started = time.time()
    start_all({"marker": marker, "fail_rank": fail_rank}, workers)
    ended = time.time()
    marks = [float(Path(f"{marker}.{rank}").read_text()) for rank in range(workers)
             if Path(f"{marker}.{rank}").exists()]
    if not marks:
        raise RuntimeError(f"no worker reached its first step ({start_all.__name__})")
    first = max(marks) - started
    failed = float(Path(f"{marker}.{fail_rank}").read_text()) if fail_rank >= 0 else ended
    for rank in range(workers):
        Path(f"{marker}.{rank}").unlink(missing_ok=True)
    return first, ended - failed


def measure(settings: Settings, workers: int = 2) -> dict[str, list[float]]:
    sides = {"launch": _launch_local, "bare": _bare}
    out: dict[str, list[float]] = {f"{s}_{m}": [] for s in sides for m in ("first", "teardown")}
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as tmp:
        for round_ in range(settings.launcher_rounds):
            for name in (("launch", "bare") if round_ % 2 == 0 else ("bare", "launch")):
                marker = os.path.join(tmp, f"{name}{round_}")
                out[f"{name}_first"].append(_timed(sides[name], marker, workers, -1)[0])
                out[f"{name}_teardown"].append(_timed(sides[name], marker + "f", workers, 1)[1])
    return out


def rows(measured: dict[str, list[float]], workers: int = 2) -> list[Row]:
    teardown = Stat.of(measured["launch_teardown"])
    bare = Stat.of(measured["bare_teardown"])
    return [
        ratio_row(f"launch.local, {workers} workers: start to first training step",
                  measured["launch_first"], "bare subprocesses", measured["bare_first"], " s",
                  Goal(1.05), digits=2),
        Row("launch.local: teardown after a worker fails", teardown.show(" s", 2),
            f"bare subprocesses (peer ends by itself): {bare.show(' s', 2)}",
            Stat.of([a / b for a, b in zip(measured["launch_teardown"],
                                           measured["bare_teardown"])]).show("x", 2)),
    ]
