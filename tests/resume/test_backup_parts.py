"""Per-worker backup parts on a real 2-worker cluster: each worker's random state that shapes
the input is restored on resume, damaged parts are refused, and a chief killed while the
parts are written leaves the previous backup to resume from."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.resume import parts_workloads as pw

pytest.importorskip("keras")


def _distance(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    killed = run_cluster(pw.parts_runs, 2, timeout=300, kwargs={"root": str(root)}, env=pw.ENV)
    assert killed.returncodes[0] == -9, killed.report()
    lost = killed.results[1]
    assert lost["interrupted"] == "CoordinationError" and "lost w0" in lost["message"], lost
    results = [json.loads((root / f"results-{rank}.json").read_text()) for rank in (0, 1)]
    resumed = run_cluster(pw.resume_killed, 2, timeout=200,
                          kwargs={"backup_dir": str(root / "killed")}, env=pw.ENV).assert_ok()
    return root, results, killed, resumed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_numpy_random_input_resumes_exactly_with_another_seed(runs):
    """Preempted mid-epoch, restarted with np.random seeded otherwise: with the parts every
    worker's resumed input stream starts from the random state the first attempt's started
    from and the run ends with the uninterrupted run's weights; without them
    (random_state=False) it starts from the restart's own state and ends elsewhere."""
    _, results, _, _ = runs
    assert results[0]["preempted"]["interrupted"] == "Preempted"
    for rank in (0, 1):
        reference, resumed = results[rank]["reference"], results[rank]["resumed"]
        assert reference["stream_start"] is not None
        assert resumed["stream_start"] == reference["stream_start"], f"worker {rank}"
        assert results[rank]["no-parts"]["stream_start"] != reference["stream_start"]
        assert _distance(resumed["weights"], reference["weights"]) <= 1e-6
        assert _distance(results[rank]["no-parts"]["weights"], reference["weights"]) > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how, problem", [
    ("deleted", r"worker-1\.json is missing"),
    ("edited", r"worker-1\.json records rank 1, epoch 1, batches 6, passes 1, workers 2, its "
               r"manifest rank 1, epoch 1, batches 4, passes 1, workers 2"),
    ("corrupted", r"worker-1\.json does not match the sha256 its manifest lists"),
])
def test_a_damaged_part_is_refused_on_every_worker_before_loading(runs, how, problem):
    _, results, _, _ = runs
    for rank in (0, 1):
        refused = results[rank][how]
        assert refused["interrupted"] == "StorageError", refused
        assert refused["unchanged"], "the backup's files keep their bytes and mtimes"
        assert f"/{how}/backup-000" in refused["message"]
        assert re.search(problem + r".*Nothing was loaded and the backup was left as it is\. "
                         r"Fix: put the file back", refused["message"]), refused["message"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_chief_killed_while_the_parts_are_written_leaves_the_previous_backup(runs):
    """The chief dies once both parts of its 3rd backup (epoch 1, after batch 6) exist, before
    its manifest: the restart resumes from the 2nd (after batch 4), restores its parts'
    random state and ends with the uninterrupted run's weights; the torn backup is deleted
    after the next commit."""
    root, results, _, resumed = runs
    assert "resuming at epoch 1, batch 5 from backup-000001" in resumed.workers[0].stdout
    for rank in (0, 1):
        reference = results[rank]["reference"]
        assert resumed.results[rank]["stream_start"] == reference["stream_start"]
        assert _distance(resumed.results[rank]["weights"], reference["weights"]) <= 1e-6
    from disttrain import storage

    [left] = [str(p) for p in (root / "killed").iterdir()]
    assert storage.is_committed(left), "one committed backup is left, the torn one deleted"
