"""Generators and PyDatasets whose later batches differ between workers: a loud error on
every worker at the epoch's end, never a silent mix or a hang."""

from __future__ import annotations

import numpy as np
import pytest

from disttrain.testing import run_cluster
from tests.keras_compat import later_batches_workloads as workloads


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_later_batches_that_differ_stop_every_worker_naming_epoch_and_step():
    """One 2-worker cluster, every case (on the old code the three differing cases trained
    to the end without an error, and the equal generator trained other weights than
    one process: the model's build drew a throwaway iterator that read the generator
    ahead and lost what it read):

    - a generator whose 5th batch differs on worker 1 raises LaterBatchMismatchError on
      both workers at the end of epoch 2, naming the input, epoch 2, step 2 and the fix;
    - a PyDataset whose 3rd of 6 batches differs (its first and last agree): epoch 1, step 3;
    - evaluate on such a generator: step 5;
    - worker 1's generator runs out after 7 of 9 batches: the error names epoch 3, step 2
      and that it ran out, and the cluster ends (no hang);
    - a fit's validation_data generator whose 4th batch differs (its first agrees):
      "the validation of epoch 1, step 4"; a validation PyDataset whose 3rd of 6 batches
      differs: step 3 (on the old code both trained silently, the val_loss from mixed data);
    - worker 1's validation generator runs out after 7 of 9 batches: step 8, "ran out",
      and the cluster ends (no hang);
    - the generator case with callbacks=keras.callbacks.CallbackList(): the same error
      (on the old code: no error);
    - a generator and a PyDataset that agree, each validated on an agreeing input of the
      other kind, train without an error to the weights of the same fits in one process
      (float tolerance: the all-reduce sums in another order).
    """
    run = run_cluster(workloads.run, 2, timeout=200).assert_ok()
    first, second = run.results
    cases = ("generator", "pydataset", "evaluate generator", "short generator",
             "validation generator", "validation pydataset", "short validation generator",
             "callback list", "equal")
    assert ({c: _errors(first[c]) for c in cases}
            == {c: _errors(second[c]) for c in cases}), run.report()
    expected = {"generator": ["fit: the generator 'x'", "epoch 2, step 2", "trained 2 step(s)"],
                "pydataset": ["fit: the PyDataset 'x'", "epoch 1, step 3", "trained 4 step(s)"],
                "evaluate generator": ["evaluate: the generator 'x'", "at step 5"],
                "short generator": ["epoch 3, step 2", "worker 1: ran out",
                                    "ran out on one worker"],
                "validation generator": ["fit: the generator 'validation_data'",
                                         "the validation of epoch 1, step 4",
                                         "evaluated 6 step(s)", "val_ metrics"],
                "validation pydataset": ["fit: the PyDataset 'validation_data'",
                                         "the validation of epoch 1, step 3",
                                         "evaluated 4 step(s)"],
                "short validation generator": ["the validation of epoch 1, step 8",
                                               "worker 1: ran out"],
                "callback list": ["fit: the generator 'x'", "epoch 2, step 2"]}
    for case, parts in expected.items():
        error = first[case]["error"]
        assert error is not None, case
        assert first[case]["type"] == "LaterBatchMismatchError", case
        for part in parts + ["its first batch agreed", "Fix:", "set_random_seed"]:
            assert part in error, (case, part, error)
    assert [outcome["error"] for outcome in first["equal"]] == [None, None]
    for got, want in zip(first["weights"]["workers"], first["weights"]["one process"]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert first["weights"]["workers"] == second["weights"]["workers"]


def _errors(outcomes):
    """The error messages of one case (a dict or a list of them), without the timings."""
    return ([o["error"] for o in outcomes] if isinstance(outcomes, list)
            else outcomes["error"])
