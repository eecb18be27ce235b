"""disttrain under Ray Train: a real local Ray cluster, TensorflowTrainer, 2 CPU workers.

Ray writes a plain worker-list TF_CONFIG for MultiWorkerMirroredStrategy, where stock
Keras 3 `fit` fails (ray-project/ray#47464). With `disttrain.strategy()` and disttrain's
ModelCheckpoint the loop trains, only Ray's rank 0 (the chief) writes checkpoints into
the shared directory, and Ray keeps the chief's last committed checkpoint with the epoch's
metrics as the run's result. Ray comes with `[test]` (through the `[ray]` extra); where it
is not installed this test skips.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import pytest

from tests.cluster import ray_workloads
from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow

EPOCHS = 2


def test_ray_tensorflow_trainer_trains_with_disttrain(tmp_path: Path, monkeypatch):
    # The workers inherit the driver's environment: they import the loop from tests/.
    # Token authentication set explicitly (a fresh token, not one saved in ~/.ray) keeps
    # Ray from warning about it; usage statistics off keeps it from asking.
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    ray = pytest.importorskip(
        "ray", reason='Ray Train is the [ray] extra: pip install ".[ray]" to run this test')
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    shared = tmp_path / "shared"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = TensorflowTrainer(
            ray_workloads.train_loop,
            train_loop_config={"directory": str(shared), "epochs": EPOCHS},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name="disttrain", storage_path=str(tmp_path / "ray")),
        ).fit()
    finally:
        ray.shutdown()

    assert result.error is None, result.error
    metrics = result.metrics
    assert metrics["epoch"] == EPOCHS and metrics["rank"] == 0
    assert metrics["is_chief"] is True and metrics["replicas"] == 2
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    committed = ["best.json", *(f"epoch{e}.keras" for e in range(1, EPOCHS + 1))]
    assert [p.name for p in shared.iterdir()] == ["rank0"]
    assert sorted(p.name for p in (shared / "rank0").iterdir()) == committed
    assert sorted(p.name for p in Path(result.checkpoint.path).iterdir()) == committed
