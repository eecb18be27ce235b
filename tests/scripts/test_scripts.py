"""Third-party scripts (tests/scripts/, each naming its source and every change) on real
2-worker clusters: TensorFlow's multi-worker Keras tutorial, keras-io's image and text
classification examples and the GAN of Keras's custom `train_step` guide."""

from __future__ import annotations

import math

import numpy as np
import pytest

from disttrain.testing import ClusterRun, run_cluster
from tests.scripts import script_workloads

CLUSTER_TIMEOUT = 240
RETRACING = "triggered tf.function retracing"


def _run(tmp_path, script: str, **kwargs) -> ClusterRun:
    return run_cluster(script_workloads.run_script, 2, kwargs={"script": script, **kwargs},
                       timeout=CLUSTER_TIMEOUT, cwd=tmp_path).assert_ok()


def _assert_identical_on_every_worker(run: ClusterRun) -> dict:
    """Every worker recorded the same calls (histories, evaluate results) and ends with
    the same weights; no worker's output holds a retracing warning. Returns worker 0's."""
    first = run.results[0]
    for worker, result in zip(run.workers[1:], run.results[1:]):
        assert result == first, f"{worker.label} differs from w0"
    for worker in run.workers:
        assert RETRACING not in worker.stdout + worker.stderr, run.report()
    return first


def _history(result: dict) -> dict:
    (method, _, history), = result["calls"]
    assert method == "fit"
    return history


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensorflow_multi_worker_tutorial(tmp_path):
    """The tutorial's `main.py` (its strategy swapped for `disttrain.strategy()`) trains
    its 2 epochs with the same history and weights on both workers."""
    run = _run(tmp_path, "multi_worker_with_keras/main.py")
    history = _history(_assert_identical_on_every_worker(run))
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_io_image_classification(tmp_path):
    """`image_dataset_from_directory` over generated JPEGs, augmentation in the
    pipeline, BatchNormalization, `jit_compile=True` and `ModelCheckpoint`: both
    workers log the same history and end with the same weights (BatchNormalization
    statistics included); XLA is turned off with a warning (CPU workers); the chief
    wrote both epochs' checkpoints."""
    run = _run(tmp_path, "image_classification_from_scratch.py")
    history = _history(_assert_identical_on_every_worker(run))
    assert set(history) == {"accuracy", "loss", "val_accuracy", "val_loss"}
    assert all(len(v) == 2 for v in history.values())
    for worker in run.workers:
        assert "Proceeding with jit_compile=False" in worker.stderr, run.report()
        assert "Deleted 2 images" in worker.stdout, run.report()
    assert {"save_at_1.keras", "save_at_2.keras"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_io_text_classification_unseeded_test_set_is_refused(tmp_path):
    """The published script reads its test set without a seed, so each process orders
    its files differently: training (seeded sets) runs, then `evaluate` raises
    InputMismatchError on every worker naming the seed fix, before any test step."""
    run = run_cluster(script_workloads.run_script, 2, timeout=CLUSTER_TIMEOUT, cwd=tmp_path,
                      kwargs={"script": "text_classification_from_scratch.py",
                              "args": ["--unseeded"], "seed": None})
    for worker in run.workers:
        assert worker.returncode not in (0, None), run.report()
        assert "InputMismatchError: evaluate: 'x' differs between workers" in worker.stderr, (
            run.report())
        assert "text_dataset_from_directory(..., seed=1337)" in worker.stderr, run.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_io_text_classification_seeded_evaluates_like_one_process(tmp_path):
    """With `seed=1337` on the test set: both workers log the same history and
    evaluation, and the 2-worker `evaluate` equals Keras's one-process evaluation of
    the same weights (every test sample counted once)."""
    run = run_cluster(script_workloads.text_classification_against_one_process, 2,
                      timeout=CLUSTER_TIMEOUT, cwd=tmp_path).assert_ok()
    result = _assert_identical_on_every_worker(run)
    (fit, _, history), (evaluate, _, (loss, accuracy)) = result["calls"]
    assert (fit, evaluate) == ("fit", "evaluate")
    assert all(len(v) == 2 for v in history.values())
    one_loss, one_accuracy = result["one_process_evaluate"]
    assert accuracy == one_accuracy
    np.testing.assert_allclose(loss, one_loss, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_guide_gan_without_call_trains(tmp_path):
    """The guide's GAN, a `keras.Model` without `call()` and its own `train_step`, is
    built where its step first uses it, as in one process: both workers log the same
    losses and end with the same weights (discriminator and generator)."""
    run = _run(tmp_path, "custom_train_step_gan.py")
    result = _assert_identical_on_every_worker(run)
    history = _history(result)
    assert set(history) == {"d_loss", "g_loss"}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in history.values())
    assert len(result["weights"]["gan"][1]) > 10
