"""Workers whose unsharded inputs start differently fail before training, on every worker.

The 2-worker cases with every check on share one cluster (`shared`, running
`input_check_workloads.shared_cases`; each case fails only its own test); the refused
`fit` (its workers exit nonzero), the opt-out (an environment variable) and each skipped
check (process-wide) run in clusters of their own."""

from __future__ import annotations

import os

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.keras_compat import input_check_workloads
from tests.support.cases import case_results

CLUSTER_TIMEOUT = 180
FAILS_WITHIN_S = 90
"""Start-up (a few seconds alone, tens on 2 shared cores) plus one batch and one exchange."""


@pytest.fixture(scope="module")
def shared():
    return run_cluster(input_check_workloads.shared_cases, 2, timeout=CLUSTER_TIMEOUT + 60)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_unseeded_shuffle_fails_on_every_worker_before_any_step():
    """An unseeded `shuffle` before batching (AUTO sharding falls back to DATA): every
    worker's `fit` raises InputMismatchError naming the argument and the fix, the worker
    exits nonzero, and no training step ran."""
    run = run_cluster(input_check_workloads.run, 2, kwargs={"kind": "unseeded", "call": "fit"},
                      timeout=CLUSTER_TIMEOUT)
    for worker in run.workers:
        assert worker.returncode not in (0, None), run.report()
        assert "InputMismatchError" in worker.stderr, run.report()
        assert "'x' differs between workers" in worker.stderr, run.report()
        assert "seed=" in worker.stderr and "DISTTRAIN_INPUT_CHECK=0" in worker.stderr
        assert input_check_workloads.STEP_MARK not in worker.stdout, run.report()
        assert worker.seconds < FAILS_WITHIN_S, run.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("call", input_check_workloads.REFUSED_CALLS)
def test_an_unseeded_shuffle_is_refused_in_every_call_before_any_step(shared, call):
    """The same input given to validation, evaluate or predict: every worker's call raises
    InputMismatchError naming the argument and the fix, and no training step ran (for
    `validation`, not even the training input's)."""
    argument = "validation_data" if call == "validation" else "x"
    for result in case_results(shared, f"refused_{call}"):
        error = result["error"]
        assert error is not None and error.startswith("InputMismatchError: "), result
        assert f"'{argument}' differs between workers" in error, error
        assert "seed=" in error and "DISTTRAIN_INPUT_CHECK=0" in error, error
        assert result["steps"] == 0, result
        assert result["seconds"] < FAILS_WITHIN_S, result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dataset_sharded_by_the_script_and_again_by_tensorflow_is_refused(shared):
    """`dataset.shard(num_workers, rank)` left to AUTO sharding (a Horovod habit): TensorFlow
    shards each worker's shard again, so the job would train on half the data. Every worker
    refuses before a step, naming the double sharding and AutoShardPolicy.OFF."""
    for result in case_results(shared, "refused_own_shard"):
        error = result["error"]
        assert error is not None and "'x' differs between workers" in error, result
        assert "calls Dataset.shard itself (on worker(s) 0, 1)" in error, error
        assert "AutoShardPolicy.OFF" in error and "1/2 of the data" in error, error
        assert result["steps"] == 0, result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_seeded_shuffle_passes_and_trains(shared):
    """The same shuffle with a seed: fit, validation, evaluate and predict all run,
    every worker logs the same numbers, and the loss goes down."""
    first, second = case_results(shared, "seeded")
    for key in ("fit", "validation", "evaluate", "predict"):
        np.testing.assert_equal(first[key], second[key])
    assert first["fit"]["loss"][-1] < first["fit"]["loss"][0]
    assert first["steps"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_opt_out_lets_an_unseeded_input_through():
    """`DISTTRAIN_INPUT_CHECK=0`: the unseeded input trains (the check is off, the
    numbers are the user's risk)."""
    run = run_cluster(input_check_workloads.run, 2, kwargs={"kind": "unseeded", "call": "fit"},
                      env={"DISTTRAIN_INPUT_CHECK": "0"}, timeout=CLUSTER_TIMEOUT).assert_ok()
    assert all(r["steps"] > 0 for r in run.results)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("skipped", ["input_check", "preflight"])
def test_each_check_is_skipped_alone(skipped):
    """`keras_compat.apply(skip=(...,))` leaves out that check only: with the input
    check skipped the unseeded input trains and the preflight still warns about a batch
    of 3 on 2 replicas (it ran only from the input check's hook before, so it was
    silently skipped too); with the preflight skipped it does not warn and the input
    check still refuses the unseeded input on every worker."""
    run = run_cluster(input_check_workloads.run, 2,
                      kwargs={"kind": "unseeded", "call": "checks", "skip": [skipped]},
                      timeout=CLUSTER_TIMEOUT).assert_ok()
    chief, other = (r["checks"] for r in run.results)
    assert other["preflight"] == []
    if skipped == "input_check":
        [warning] = chief["preflight"]
        assert "not divisible by the 2 replicas" in warning
        assert chief["input_mismatch"] is None and other["input_mismatch"] is None
    else:
        assert chief["preflight"] == []
        for result in (chief, other):
            assert "'x' differs between workers" in (result["input_mismatch"] or "")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["file", "off"])
def test_file_sharded_and_unsharded_inputs_are_not_checked(shared, kind):
    """An unseeded shuffle after TensorFlow splits the input by file (AUTO on a text
    reader), or on the worker's own shard with `AutoShardPolicy.OFF`: each worker's
    input is meant to differ, so nothing is checked and training runs."""
    assert all(r["steps"] > 0 for r in case_results(shared, kind))


def test_which_inputs_tensorflow_shards_by_element(tmp_path):
    """AUTO on in-memory slices and DATA are checked; AUTO over file readers (alone or
    inside interleave), FILE, OFF and non-datasets are not."""
    import tensorflow as tf

    from disttrain.keras_compat.input_check import _shards_by_element

    path = os.fspath(tmp_path / "part.txt")
    with open(path, "w") as f:
        f.write("1\n2\n")

    def with_policy(dataset, policy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = policy
        return dataset.with_options(options)

    policy = tf.data.experimental.AutoShardPolicy
    slices = tf.data.Dataset.from_tensor_slices(np.arange(8)).shuffle(8).batch(2)
    cases = {
        "slices": (slices, True),
        "data_over_files": (with_policy(tf.data.TextLineDataset([path]), policy.DATA), True),
        "text_lines": (tf.data.TextLineDataset([path]).batch(2), False),
        "interleaved_records": (tf.data.Dataset.from_tensor_slices([path]).interleave(
            tf.data.TFRecordDataset).batch(2), False),
        "file": (with_policy(slices, policy.FILE), False),
        "off": (with_policy(slices, policy.OFF), False),
        "numpy": (np.arange(8), False),
    }
    assert {k: _shards_by_element(d) for k, (d, _) in cases.items()} == {
        k: expected for k, (_, expected) in cases.items()}


def test_the_fingerprint_sees_order_and_length_not_the_iterator_in_use():
    """A seeded pipeline gives the same fingerprint in two fresh copies; an unseeded
    one differs between draws; the length counts; a training iterator in progress is
    not advanced by fingerprinting."""
    import tensorflow as tf

    from disttrain.keras_compat.input_check import fingerprint

    def pairs(n=16):
        return tf.data.Dataset.from_tensor_slices((np.arange(n), np.arange(n) % 3))

    assert (fingerprint(pairs().shuffle(16, seed=3).batch(4))
            == fingerprint(pairs().shuffle(16, seed=3).batch(4)))
    unseeded = pairs().shuffle(16).batch(4)
    assert fingerprint(unseeded) != fingerprint(unseeded)
    assert fingerprint(pairs(16).batch(4))["batches"] == 4
    assert fingerprint(pairs(12).batch(4)) != fingerprint(pairs(16).batch(4))
    assert fingerprint(pairs().batch(4).take(0)) == {"batches": 0, "inputs": None,
                                                     "targets": None}
    assert fingerprint(pairs().batch(4).repeat())["batches"] == -1
    strings = tf.data.Dataset.from_tensor_slices(["a", "bc"]).batch(2)
    assert fingerprint(strings)["targets"] is None
    in_order = pairs().batch(4)
    training = iter(in_order)
    next(training)
    fingerprint(in_order)
    assert next(training)[0].numpy().tolist() == [4, 5, 6, 7]
