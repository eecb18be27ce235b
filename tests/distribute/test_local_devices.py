"""Several replicas in one process (`disttrain.strategy(local_devices=...)`), on CPU.

Logical CPUs stand in for one host's GPUs: `MirroredStrategy` over 2 of them must train as the
default strategy does on one device (seeded, the same global batch), with disttrain's
callbacks deciding and writing the same. What needs real GPUs (MirroredStrategy over visible
GPUs by default, workers × GPUs replicas under MultiWorkerMirroredStrategy) is not run here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.distribute import local_devices_workloads


@pytest.mark.slow
def test_two_logical_devices_train_as_one(tmp_path):
    def fit(cpus: int) -> dict:
        workdir = tmp_path / f"cpus{cpus}"
        workdir.mkdir()
        run = run_cluster(local_devices_workloads.fit_with_callbacks, 1, timeout=180,
                          kwargs={"workdir": str(workdir), "logical_cpus": cpus}).assert_ok()
        return run.results[0]

    with ThreadPoolExecutor(2) as pool:  # two separate processes, at once
        mirrored, single = pool.map(fit, (2, 1))
    assert (mirrored["strategy"], mirrored["replicas"]) == ("MirroredStrategy", 2)
    assert single["replicas"] == 1
    assert mirrored["history"].keys() == single["history"].keys()
    for key, values in single["history"].items():
        np.testing.assert_allclose(mirrored["history"][key], values, rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    # EarlyStopping (patience 1, min_delta 1.0) stopped both after 2 epochs; ReduceLROnPlateau
    # (patience 0) halved the rate after the second.
    assert len(single["history"]["loss"]) == 2
    assert single["lr"] == mirrored["lr"] == pytest.approx(0.1)
    for name in ("weights", "best"):
        for a, b in zip(mirrored[name], single[name], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert mirrored["written"] == single["written"]
    assert "RUN/best.keras" in single["written"] and "log.csv" in single["written"]


def test_local_devices_refused_where_they_cannot_apply():
    from disttrain.cluster import Cluster
    from disttrain.distribute import _check_local_devices
    from disttrain.errors import StrategyError

    two = Cluster(workers=("127.0.0.1:1", "127.0.0.1:2"))
    assert _check_local_devices(["/gpu:0", "/gpu:1"], Cluster()) == ("/gpu:0", "/gpu:1")
    assert _check_local_devices("one", two) == "one"
    with pytest.raises(StrategyError, match="MultiWorkerMirroredStrategy places"):
        _check_local_devices(["/gpu:0"], two)
    for bad in ("some", [], [""], 2):
        with pytest.raises(StrategyError, match="Fix: use 'all'"):
            _check_local_devices(bad, Cluster())
