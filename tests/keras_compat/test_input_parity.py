"""NumPy arrays, PyDatasets and generators on 2 workers: one process's training, or a refusal."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.keras_compat import input_parity_workloads as workloads


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_array_pydataset_and_generator_inputs_train_as_one_process_or_refuse():
    """One 2-worker cluster, every case (each failed on the old code, see the report):

    - `fit(x, y, shuffle=True)` without a global seed trains every sample once per
      epoch (the summed sample ids of each epoch are a full pass), so does a shuffled
      PyDataset, and a generator trains all its batches after the check drew its first;
    - arrays (with `validation_split`), `validation_data`, a PyDataset, a generator and
      evaluate's `sample_weight` that differ on worker 1, and global seeds that differ
      while Keras shuffles, raise InputMismatchError on both workers before any step,
      naming the input and the fix;
    - with `keras.utils.set_random_seed`, 3 shuffled epochs on 2 workers end with
      the weights of the same fit in one process (the order agrees from epoch 2 on too);
    - `shuffle="batch"`: without a global seed every epoch trains every sample once
      (the old code: 37 of 48 ids per epoch), and with one each worker trains its half
      of one process's batch at every step of 3 epochs (the old code: another order
      from epoch 2);
    - a PyDataset that reorders itself in `on_epoch_end` with NumPy's unseeded global
      RNG raises InputMismatchError before the first step (it reorders before epoch 1
      too), naming the class and the fix; reordered from a shared seed, it trains
      every sample once per epoch.
    """
    run = run_cluster(workloads.run, 2, timeout=240).assert_ok()
    first, second = run.results
    print(f"per-epoch PyDataset check: {first['epoch_check_ms']:.1f} ms (median)")
    per_worker = ("batch_shuffle", "epoch_check_ms")  # each worker's own batches and timing
    assert ({k: v for k, v in first.items() if k not in per_worker}
            == {k: v for k, v in second.items() if k not in per_worker}), run.report()
    full = [workloads.FULL_PASS] * workloads.EPOCHS
    assert first["unseeded_ids"] == full
    assert first["pydataset_ids"] == full
    assert first["generator_ids"] == full
    errors = first["errors"]
    expected = {"x with validation_split": ["fit: x differs", "validation_split=0.25",
                                            "not held out"],
                "validation_data": ["fit: validation_data[1] differs"],
                "pydataset": ["fit: x (batch 0) differs", "PyDataset"],
                "generator": ["fit: x (first batch) differs", "generator"],
                "evaluate sample_weight": ["evaluate: sample_weight differs"],
                "global seed": ["global seeds differ (worker 0: 1; worker 1: 2)"],
                "pydataset reordered": ["fit: the PyDataset Reordered differs", "epoch 1",
                                        "on_epoch_end", "default_rng(seed + epoch)"]}
    for case, parts in expected.items():
        assert errors[case] is not None, case
        for part in parts + ["set_random_seed"]:
            assert part in errors[case], (case, errors[case])
    assert not first["trained_while_refused"]
    workers, one_process = first["seeded"]["workers"], first["seeded"]["one process"]
    for got, want in zip(workers, one_process):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert first["reordered_ids"] == full
    batches = workloads.SAMPLES // workloads.GLOBAL_BATCH
    unseeded = [first["batch_shuffle"]["unseeded"], second["batch_shuffle"]["unseeded"]]
    for epoch in range(workloads.EPOCHS):
        trained = sorted(i for ids in unseeded for step in ids[epoch * batches:][:batches]
                         for i in step)
        assert trained == list(range(workloads.SAMPLES)), (epoch, trained)
    one_process = first["batch_shuffle"]["one process"]
    half = workloads.GLOBAL_BATCH // 2
    assert len(one_process) == workloads.EPOCHS * batches
    for rank, worker in enumerate((first, second)):
        assert worker["batch_shuffle"]["workers"] == [
            step[rank * half:(rank + 1) * half] for step in one_process], rank


def test_the_array_digest_reads_in_place_and_sees_order():
    """Hashing 64 MB of arrays allocates under 1 MB (no copy); a permutation of the
    rows, a changed value and another dtype each change the digest."""
    from disttrain.keras_compat.digest import array_fingerprint

    x = np.arange(8 << 20, dtype="float64").reshape(-1, 8)
    array_fingerprint(x[:1])  # imports TensorFlow outside the measurement
    tracemalloc.start()
    digest = array_fingerprint({"a": x, "b": [x[:4], None]})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert set(digest) == {"['a']", "['b'][0]"}
    assert array_fingerprint(x) == array_fingerprint(x.copy())
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    changed = x.copy()
    changed[-1, -1] += 1
    assert len({array_fingerprint(v)[""] for v in (x, swapped, changed, x.astype("float32"))}) == 4
