"""A worker of `launch.local` for tests/launch/test_local_firewall.py: `python -m tests.launch.firewall_workload DIR`.

Starts MultiWorkerMirroredStrategy (so TensorFlow's gRPC server listens on the TF_CONFIG
port), writes that port to `DIR/<task label>.port`, waits up to 120 s for `DIR/go` (the test
probes the port meanwhile), then trains `tests.keras_compat.workloads.sequential` for one epoch (the same
strategy: disttrain makes one per process) and prints `TRAINED` with its loss.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from disttrain.cluster import Cluster, parse_address
from disttrain.distribute import strategy as make_strategy
from tests.keras_compat import workloads


def main(directory: str) -> None:
    cluster = Cluster.from_env()
    make_strategy()
    port = parse_address(cluster.training_addresses[cluster.worker_rank])[1]
    Path(directory, f"{cluster.label}.port").write_text(str(port))
    go = Path(directory, "go")
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go file within 120 s")
        time.sleep(0.1)
    history = workloads.sequential(batchnorm=False, epochs=1)["history"]
    print(f"TRAINED loss={history['loss'][-1]:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
