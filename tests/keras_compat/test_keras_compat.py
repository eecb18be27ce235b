"""Keras 3 fit/evaluate/predict on real localhost MWMS clusters, with and without the fixes.

The 2-worker cases with every fix share one cluster (`every_fix`, running
`workloads.with_every_fix`); those without the persistent iterator another, those without
the BatchNormalization and multi-step fixes a third; each case runs in a new model and
fails only its own test (tests/support/cases.py). A different worker count or
environment gets its own cluster."""

from __future__ import annotations

import numpy as np
import pytest

from disttrain.keras_compat import versions
from disttrain.testing import run_cluster
from tests.keras_compat import workloads
from tests.support.cases import case_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def every_fix(tmp_path_factory):
    # 14 cases one after the other: room for cores shared with other test runs.
    return run_cluster(workloads.with_every_fix, 2, timeout=540,
                       kwargs={"directory": str(tmp_path_factory.mktemp("saves"))})


@pytest.fixture(scope="module")
def without_persistent_iterator():
    return run_cluster(workloads.without_persistent_iterator, 2, timeout=300)


@pytest.fixture(scope="module")
def without_three_fixes(tmp_path_factory):
    return run_cluster(workloads.without_three_fixes, 2, timeout=240,
                       kwargs={"directory": str(tmp_path_factory.mktemp("saves"))})


def _assert_all_identical(results: list[dict], keys=("history", "evaluate", "predict", "weights")):
    first = results[0]
    for i, other in enumerate(results[1:], start=1):
        for key in keys:
            assert other[key] == first[key], f"worker {i} differs from worker 0 in {key!r}"


def _assert_close(a, b, rtol=1e-4, atol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k], rtol, atol)
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("num_workers", [2, 3])
def test_sequential_batchnorm_identical_on_every_worker(num_workers, request):
    if num_workers == 2:
        results = case_results(request.getfixturevalue("every_fix"), "sequential_batchnorm")
    else:
        results = run_cluster(workloads.sequential, num_workers,
                              kwargs={"batchnorm": True}).assert_ok().results
    _assert_all_identical(results)
    moving = [p for p in results[0]["non_trainable"] if "moving" in p]
    assert len(moving) == 2, results[0]["non_trainable"]
    initial = {"moving_mean": 0.0, "moving_variance": 1.0}
    for path in moving:
        values = np.asarray(results[0]["weights"][path])
        start = initial[path.rsplit("/", 1)[-1]]
        assert not np.allclose(values, start), f"{path} never updated"
    assert len(results[0]["predict"]) == 70
    assert results[0]["history"]["val_loss"][-1] < results[0]["history"]["val_loss"][0] * 1.5


def test_matches_single_process_global_batch(every_fix):
    multi = case_results(every_fix, "sequential")
    single = run_cluster(workloads.sequential, 1, kwargs={"batchnorm": False}).assert_ok()
    a, b = multi[0], single.results[0]
    _assert_all_identical(multi)
    _assert_close(a["history"], b["history"])
    _assert_close(a["evaluate"], b["evaluate"])
    _assert_close(a["predict"], b["predict"])
    _assert_close(a["weights"], b["weights"])


def test_functional_dict_inputs_sample_weights_steps_per_epoch(every_fix):
    results = case_results(every_fix, "functional_dict")
    _assert_all_identical(results)
    history = results[0]["history"]
    assert set(history) == {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"}
    assert len(history["loss"]) == 2
    assert len(results[0]["predict"]) == 64


def test_stock_keras_fails_without_compat():
    """When this starts passing upstream, the fixes' detectors should switch off."""
    run = run_cluster(workloads.fails_without_compat, 2, timeout=120).assert_ok()
    for result in run.results:
        assert result["error"] is not None, "stock Keras 3 trained under MWMS: revisit keras_compat"
        assert "PerReplica" in result["error"] or "reduction dimension" in result["error"]


def test_batchnorm_statistics_drift_without_that_fix(without_three_fixes):
    a, b = case_results(without_three_fixes, "batchnorm_statistics")
    moving = [p for p in a["non_trainable"] if "moving" in p]
    assert any(a["weights"][p] != b["weights"][p] for p in moving), (
        "BatchNormalization statistics agreed without the fix: revisit keras_compat"
    )


@pytest.mark.parametrize("steps_per_execution", workloads.STEPS_PER_EXECUTION)
def test_steps_per_execution_matches_one_step_per_call(every_fix, steps_per_execution):
    """8 batches an epoch: k=3 ends each epoch with a short call (3, 3, 2), k=8 fits
    exactly, k=20 ends every call at the end of the data; evaluate and predict run
    multi-step too. Every worker ends identical, and equal to the same cluster with k=1
    (BatchNormalization normalises each worker's half batch, so not to one process)."""
    multi = case_results(every_fix, f"steps_per_execution_{steps_per_execution}")
    reference = case_results(every_fix, "sequential_batchnorm")
    _assert_all_identical(multi)
    a, b = multi[0], reference[0]
    for key in ("history", "evaluate", "predict", "weights"):
        _assert_close(a[key], b[key])


def test_stock_multi_step_loop_fails_without_that_fix(without_three_fixes):
    """When this starts passing upstream, `multi_worker_steps_per_execution` should go."""
    for result in case_results(without_three_fixes, "multi_step"):
        assert result["error"] is not None, "stock multi-step loop ran: revisit keras_compat"
        assert "You must feed a value for placeholder tensor" in result["error"]


def test_every_workers_save_to_one_path_leaves_a_whole_file(every_fix):
    """`model.save` / `save_weights` after `fit` runs on every worker; with the same local
    path (one machine, a shared volume) each worker's write still leaves one whole file with
    the trained weights, in every format, and no temp file behind."""
    for result in case_results(every_fix, "concurrent_saves"):
        for fmt, outcome in result["formats"].items():
            assert outcome == {"save_errors": [], "unreadable": []}, (fmt, outcome)
        rounds = (len(result["left"]) - 1) // len(workloads.SAVE_FORMATS)
        assert result["left"] == sorted(["latest.keras", *(
            f"model-{i}{fmt}" for i in range(rounds) for fmt in workloads.SAVE_FORMATS)])
        assert result["link"] == "model-0.keras", "a save through a link writes where it points"


def test_one_process_saves_as_keras_does(tmp_path):
    """`multi_worker_atomic_saves` is installed in every process but stages a save only under
    multi-worker training: one process writes its paths in place, as Keras does."""
    (result,) = run_cluster(workloads.one_process_saves, 1, timeout=120,
                            kwargs={"directory": str(tmp_path)}).assert_ok().results
    assert result["atomic_saves_installed"]
    assert result["staged"] == []
    assert result["left"] == sorted(f"model{fmt}" for fmt in workloads.SAVE_FORMATS)


def test_concurrent_saves_tear_files_without_that_fix(without_three_fixes):
    """Measured: Keras writes the path in place, so the workers' writes mix (a `.keras` with
    a bad CRC, an HDF5 file with other weights) or one fails on HDF5's lock. When this
    starts passing upstream, `multi_worker_atomic_saves` should go."""
    damaged = [f"w{rank} {fmt}: {outcome}"
               for rank, result in enumerate(case_results(without_three_fixes, "concurrent_saves"))
               for fmt, outcome in result["formats"].items()
               if outcome["save_errors"] or outcome["unreadable"]]
    assert damaged, "every concurrent save was whole without the fix: revisit keras_compat"


def test_steps_per_execution_with_xla_on_cpu_workers_trains_without_xla(every_fix):
    """On CPU workers `multi_worker_cpu_without_xla` turns XLA off (with a warning) before
    the multi-step fix sees it, so the combination trains; on GPU workers, where XLA stays
    on, the multi-step fix's KerasCompatError applies (no GPU here to run that path)."""
    for result in case_results(every_fix, "multi_step_with_xla"):
        assert result["error"] is None, result
        assert any("Proceeding with jit_compile=False" in w for w in result["warnings"]), result
        assert result["trained"] > 0 and result["jit_compile"] is False


@pytest.mark.parametrize("steps_per_execution, numpy_input", workloads.ITERATOR_VARIANTS)
def test_persistent_epoch_iterator_trains_on_the_same_batches_as_new_iterators(
        every_fix, without_persistent_iterator, steps_per_execution, numpy_input):
    """One repeated input iterator per fit/evaluate/predict call gives the same
    training as Keras's new iterators per epoch (tf.data or NumPy training input,
    NumPy validation, an epoch stopped mid-way, a second fit; with 3 steps per
    call, 8 batches end each epoch with a call of 2 and the 3 validation batches
    fit one call), identical on every worker; Keras's iterator creations (two per
    epoch and one per validation) drop to one per call."""
    case = workloads.iterator_case(steps_per_execution, numpy_input)
    ours = case_results(every_fix, case)
    stock = case_results(without_persistent_iterator, case)
    _assert_all_identical(ours, keys=("history", "history_again", "evaluate", "predict",
                                      "weights"))
    a, b = ours[0], stock[0]
    assert len(a["history"]["loss"]) == 3, "the callback stops fit in its third epoch"
    for key in ("history", "history_again", "evaluate", "predict", "weights"):
        _assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    # Ours: fit builds the model from a first iterator, then trains from one more;
    # its validation data gets one; the second fit, evaluate and predict one each.
    assert a["iterators_created"] == {"fit": 3, "fit_again": 2, "evaluate": 1, "predict": 1}
    assert b["iterators_created"]["fit"] >= 3 * 2 + 3 * 2, b["iterators_created"]


def test_persistent_epoch_iterator_with_a_shuffled_input(every_fix):
    """A seeded tf.data shuffle: every worker trains the same, every epoch."""
    results = case_results(every_fix, "epoch_iterators_shuffled")
    _assert_all_identical(results, keys=("history", "history_again", "evaluate", "predict",
                                         "weights"))
    result = results[0]
    assert result["iterators_created"]["fit"] == 3
    assert result["history_again"]["loss"][-1] < result["history"]["loss"][0]


def test_a_pipeline_reading_a_variable_keeps_keras_iterators(every_fix):
    """A callback changes a variable the input's `map` reads: every batch of the next
    epoch sees the new value (a persistent iterator would have prefetched several
    batches with the old one), because such inputs keep Keras's iterators."""
    for result in case_results(every_fix, "epoch_state_pipeline"):
        for epoch, running in enumerate(result["losses"]):
            assert running == pytest.approx([epoch ** 2] * 8), (epoch, running)
        assert result["iterators_created"] >= 3 * 2


def test_numpy_shuffle_replays_one_permutation_per_new_iterator():
    """What the persistent iterator changes for NumPy inputs with `shuffle=True`
    under a global seed: Keras's pipeline draws its permutation inside the dataset,
    so each new iterator (Keras's per-epoch path) replays the same one, while one
    repeated iterator (disttrain's multi-worker path) draws a new one per pass."""
    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    x = np.arange(64, dtype="float32")

    def first_batches(repeat: bool) -> list[list[float]]:
        keras.utils.set_random_seed(7)
        dataset = ArrayDataAdapter(x, batch_size=64, shuffle=True).get_tf_dataset()
        if repeat:
            passes = iter(dataset.repeat())
            return [next(passes).numpy().tolist() for _ in range(3)]
        return [next(iter(dataset)).numpy().tolist() for _ in range(3)]

    new_iterators, repeated = first_batches(False), first_batches(True)
    assert new_iterators[0] == new_iterators[1] == new_iterators[2]
    assert repeated[0] == new_iterators[0]
    if versions.release(keras.__version__) >= (3, 16):
        # keras-nightly 3.16 replays its permutation on every pass too: no difference.
        assert repeated == new_iterators
    else:
        assert repeated[1] != repeated[0] and repeated[2] != repeated[1]
    for permutation in repeated:
        assert sorted(permutation) == x.tolist()


def test_pipelines_that_capture_state_are_recognised():
    """`persistent_epoch_iterator` keeps Keras's iterators for an input whose
    functions capture a variable or lookup table, wherever it sits in the pipeline,
    and only for those."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from disttrain.keras_compat.pipeline import captures_state

    level = tf.Variable(1.0)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer([0], [1], tf.int64, tf.int64), -1)
    plain = tf.data.Dataset.range(8).map(lambda i: i * 2).batch(2).prefetch(1)
    reads_variable = tf.data.Dataset.range(8).map(lambda i: tf.cast(i, tf.float32) * level)
    stateful = {
        "map": reads_variable.batch(2),
        "filter": tf.data.Dataset.range(8).filter(lambda i: tf.cast(i, tf.float32) > level),
        "lookup": tf.data.Dataset.range(8).map(table.lookup),
        "zip": tf.data.Dataset.zip((plain.unbatch(), reads_variable)).batch(2),
        "interleave": tf.data.Dataset.range(2).interleave(
            lambda i: tf.data.Dataset.range(i).map(lambda j: tf.cast(j, tf.float32) * level)),
    }
    stateless = {
        "plain": plain,
        "shuffle": tf.data.Dataset.range(8).shuffle(8, seed=1).batch(2),
        "random_op": tf.data.Dataset.range(8).map(lambda i: tf.random.uniform(())),
        "keras_arrays": ArrayDataAdapter(np.zeros((8, 2), "float32"), batch_size=2,
                                         shuffle=True).get_tf_dataset(),
    }
    assert {name: captures_state(d) for name, d in stateful.items()} == dict.fromkeys(
        stateful, True)
    assert {name: captures_state(d) for name, d in stateless.items()} == dict.fromkeys(
        stateless, False)
