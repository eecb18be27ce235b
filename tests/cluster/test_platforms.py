"""TF_CONFIG as Vertex AI, Kubeflow TFJob, SageMaker and Ray Train write it, on real clusters.

Addresses are rewritten to 127.0.0.1 with free ports; every other key is as the
platform writes it (tests/cluster/platform_shapes.py). The platform's chief must be the
only writer, every training task must log the same losses, and the TFJob and
Vertex AI evaluator must stay out of the training cluster.
"""

from __future__ import annotations

import json

import portpicker
import pytest

from disttrain.testing import run_cluster
from tests.cluster import platform_workloads
from tests.cluster.platform_shapes import SHAPES

pytestmark = pytest.mark.slow

EVALUATED = ("vertex_ai", "tfjob", "tfjob_master")


def _platform_tf_configs(shape: str, training: int, evaluator: bool):
    """`per_worker_env` giving each task the platform's TF_CONFIG; new ports per attempt
    (the harness asks for rank 0 first)."""
    configs: list[dict] = []

    def per_worker_env(rank: int) -> dict[str, str]:
        if rank == 0:
            addresses = [f"127.0.0.1:{portpicker.pick_unused_port()}"
                         for _ in range(training + evaluator)]
            configs[:] = SHAPES[shape](addresses[:training],
                                       addresses[training] if evaluator else None)
        return {"TF_CONFIG": json.dumps(configs[rank])}

    return per_worker_env


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_platform_tf_config_trains_with_its_chief_as_the_only_writer(shape, tmp_path):
    evaluator = shape in EVALUATED
    run = run_cluster(platform_workloads.train_with_checkpoint, num_workers=2 + evaluator,
                      kwargs={"directory": str(tmp_path)},
                      per_worker_env=_platform_tf_configs(shape, 2, evaluator), timeout=240)
    run.assert_ok()
    training = [r for r in run.results if "is_chief" in r]
    assert [r["rank"] for r in training] == [0, 1]
    assert [r["is_chief"] for r in training] == [True, False]
    assert {r["replicas"] for r in training} == {2}
    assert training[0]["loss"] == training[1]["loss"]
    chief_label = "chief" if shape.startswith(("vertex", "tfjob")) else "w0"
    assert training[0]["label"] == chief_label
    assert training[0]["wrote"] == ["best.json", "model.keras"]
    assert training[1]["wrote"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [chief_label]
    if evaluator:
        assert run.results[-1] == {"label": "evaluator", "strategy": "_DefaultDistributionStrategy",
                                   "replicas": 1}
