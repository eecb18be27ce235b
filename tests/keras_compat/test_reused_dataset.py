"""A reshuffling dataset object used again after disttrain's persistent epoch iterator read
it, on a real 2-worker cluster."""

from __future__ import annotations

import pytest

from disttrain.testing import run_cluster
from tests.keras_compat import reused_dataset_workloads


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_reshuffling_dataset_reused_after_fit_orders_as_with_plain_keras():
    """After `fit` (with validation), `evaluate`, `predict` and a second `fit`, a new
    pass over the same seeded, reshuffling dataset objects gives every worker the order
    plain Keras in one process gives after the same calls, although the persistent
    iterator's prefetching ran ahead into later passes of its repeated input."""
    run = run_cluster(reused_dataset_workloads.reused_dataset_orders, 2,
                      timeout=150).assert_ok()
    for worker, result in zip(run.workers, run.results):
        assert result["disttrain"] == result["keras"], f"{worker.label}\n{run.report()}"
    assert run.results[0]["disttrain"] == run.results[1]["disttrain"]
