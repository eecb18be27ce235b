"""Exact resume on real clusters: an input that reshuffles and augments at random every epoch
continues where it stopped, on the same and on another number of workers."""

from __future__ import annotations

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.resume import resume_workloads as rw
from tests.support.models import dense_model

pytest.importorskip("keras")

# (epoch, batch) after which every worker raises; 8 batches an epoch, 3 epochs.
POINTS = [[1, 0], [1, 5], [2, 3]]
# Worker 1's SIGTERM after epoch 1's 7th batch: the stop is agreed on the 8th, the last.
PREEMPT_AT = [0, 6]


def _assert_weights_equal(got, want, atol):
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact-resume")
    run = run_cluster(rw.interrupted_and_resumed, 2, timeout=400, kwargs={
        "backup_root": str(root), "points": POINTS, "preempt_at": PREEMPT_AT}).assert_ok()
    assert run.results[0] == run.results[1], "every worker ends with the same state"
    return root, run.results[0]


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_shuffled_augmented_input_resumes_exactly_at_several_points(two_workers):
    """Interrupted after epoch 2's first batch, in epoch 2's middle and in epoch 3 (backups
    every batch), each resumed run ends with the uninterrupted run's weights and
    EarlyStopping state; the interrupted epoch's samples are trained exactly once in all."""
    _, results = two_workers
    reference = results["reference"]
    assert [sum(c) for c in reference["epoch_counts"]] == [rw.SAMPLES] * rw.EPOCHS
    for i, (epoch, _) in enumerate(POINTS):
        stopped, resumed = results[f"point-{i}"]["stopped"], results[f"point-{i}"]["resumed"]
        assert stopped["interrupted"] == "Interrupt"
        assert resumed["epochs_run"] == rw.EPOCHS - epoch
        assert resumed["best_epoch"] == reference["best_epoch"]
        _assert_weights_equal(resumed["weights"], reference["weights"], atol=1e-6)
        once = np.asarray(stopped["counts"]) + np.asarray(resumed["epoch_counts"][0])
        assert once.tolist() == [1] * rw.SAMPLES, f"point {POINTS[i]}: each sample once"
    assert results["preempted"]["interrupted"] == "Preempted"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_backup_resumes_on_three_workers_and_back_on_two(two_workers, tmp_path):
    """The 2-worker backup taken at epoch 1's end (a preemption on its last batch) resumes
    on 3 workers with the same global batch; those 3 workers' own preempted backup (epoch
    2, after batch 4) resumes on 2. Both end with the uninterrupted 2-worker run's weights
    (to float rounding of another all-reduce) and EarlyStopping state, and the resumed
    epoch trains each of its remaining samples once."""
    root, results = two_workers
    reference = results["reference"]
    three = run_cluster(rw.resumed_then_preempted, 3, timeout=400, kwargs={
        "resume_dir": str(root / "preempted"), "backup_dir": str(tmp_path / "three"),
        "preempt_at": [1, 2]}).assert_ok()
    assert ("was written on 2 workers, this run has 3: it resumes with the same global batches; "
            "the random states of its 2 worker parts") in three.workers[0].stderr
    resumed = three.results[0]["resumed"]
    assert resumed["epochs_run"] == 2 and resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["epoch_counts"] == [[1] * rw.SAMPLES] * 2
    _assert_weights_equal(resumed["weights"], reference["weights"], atol=1e-5)
    assert three.results[0]["preempted"]["interrupted"] == "Preempted"

    two = run_cluster(rw.resumed, 2, timeout=300,
                      kwargs={"backup_dir": str(tmp_path / "three")}).assert_ok()
    assert ("was written on 3 workers, this run has 2: it resumes with the same global batches; "
            "the random states of its 3 worker parts") in two.workers[0].stderr
    resumed = two.results[0]
    assert resumed["epochs_run"] == 2 and resumed["best_epoch"] == reference["best_epoch"]
    first, last = resumed["epoch_counts"]
    assert set(first) == {0, 1} and sum(first) == rw.SAMPLES - 4 * rw.GLOBAL_BATCH
    assert last == [1] * rw.SAMPLES
    _assert_weights_equal(resumed["weights"], reference["weights"], atol=1e-5)


def test_one_worker_resumes_a_reshuffling_input_on_a_fresh_pass_and_warns(tmp_path):
    """One process has no persistent iterator: a resumed epoch of a reshuffling input sees
    another order than an uninterrupted run, and a warning says why."""
    import keras
    import tensorflow as tf

    from disttrain import callbacks

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # the last backup: epoch 2, after 2 of its 4 batches
                raise rw.Interrupt()

    def fit(extra):
        model = dense_model(3, seed=0)
        model.compile("sgd", "mse")
        data = tf.data.Dataset.from_tensor_slices((np.ones((16, 3)), np.ones((16, 1))))
        model.fit(data.shuffle(16, seed=1).batch(4), epochs=2, verbose=0, callbacks=[
            callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=2), *extra])

    with pytest.raises(rw.Interrupt):
        fit([Interrupt()])
    with pytest.warns(UserWarning, match=r"resuming after 1 whole passes over an input whose "
                      r"passes differ .*another order .*docs/resume.md"):
        fit([])
