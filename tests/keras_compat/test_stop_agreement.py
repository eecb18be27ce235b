"""A stop asked by any callback on one worker ends fit on every worker, whatever the order."""

from __future__ import annotations

import pytest

from disttrain.keras_compat import stop_agreement
from disttrain.testing import run_cluster
from tests.keras_compat import stop_agreement_workloads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("num_workers, stop_rank", [(2, 1), (1, 0)])
def test_a_stop_on_one_worker_at_epoch_end_stops_every_worker(num_workers, stop_rank):
    """The stopper comes first, before disttrain's callbacks, and no SyncStop is in the
    list: every worker still ends after the same epoch (the third) and exits 0. One
    worker alone (the default strategy) stops there too, with no vote.

    EarlyStopping's vote and ReduceLROnPlateau's learning rates travel in the stop vote:
    each epoch end is one exchange on several workers, none in one process."""
    run = run_cluster(stop_agreement_workloads.stop_on_one_worker, num_workers,
                      kwargs={"stop_rank": stop_rank, "stop_epoch": 2}, timeout=180).assert_ok()
    assert [r["epochs_run"] for r in run.results] == [3] * num_workers
    assert [r["batches"] for r in run.results] == [[8, 8, 8]] * num_workers
    per_epoch = [stop_agreement.EPOCH_END] if num_workers > 1 else []
    assert [r["exchanges"] for r in run.results] == [[per_epoch] * 3] * num_workers


def test_deciding_callbacks_that_differ_between_workers_fail_on_every_worker():
    """ReduceLROnPlateau on the chief only: the first epoch end names the difference on
    both workers instead of leaving one waiting for a broadcast the other never makes."""
    run = run_cluster(stop_agreement_workloads.stop_on_one_worker, 2,
                      kwargs={"stop_rank": 1, "stop_epoch": 2, "reduce_lr_on_ranks": [0]},
                      timeout=180).assert_ok()
    for result in run.results:
        assert result["error"].startswith("CallbackConfigError: disttrain callbacks differ "
                                          "between workers"), result
        assert "ReduceLROnPlateau-1.lr" in result["error"] and "Fix:" in result["error"]


def test_a_mid_epoch_stop_is_agreed_after_that_batch_when_asked():
    """`SyncStop(per_batch=True)`, even first in the list, makes every worker vote after
    each batch: a stop on worker 1 at batch 3 of the second epoch ends both there."""
    run = run_cluster(stop_agreement_workloads.stop_on_one_worker, 2,
                      kwargs={"stop_rank": 1, "stop_epoch": 1, "stop_batch": 3},
                      timeout=180).assert_ok()
    assert [r["epochs_run"] for r in run.results] == [2, 2]
    assert [r["batches"] for r in run.results] == [[8, 4], [8, 4]]
