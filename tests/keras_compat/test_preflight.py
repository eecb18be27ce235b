"""Preflight: each configuration mistake on a real 2-worker cluster, one fit per case."""

from __future__ import annotations

import pytest

from disttrain.keras_compat import preflight
from disttrain.testing import run_cluster
from tests.keras_compat import preflight_workloads

CASES = {
    "indivisible": (None, "the global batch (the dataset's batch: 3) is not divisible by the "
                          "2 replicas"),
    "too_small": ("the global batch (the dataset's batch: 1) is smaller than the 2 replicas",
                  None),
    "steps_too_many": ("steps_per_epoch=100 but the input holds 8 global batches", None),
    "runs_out": (None, "training would stop after epoch 1. Fix: dataset.repeat()"),
    "data_fallback": (None, "AUTO falls back to DATA: each of the 2 workers runs the whole "
                            "pipeline (Map) on every element"),
    "file_auto": ("'x' is sharded by file (AUTO: it reads files) but has 1 file(s) for 2 "
                  "workers", None),
    "file_explicit": ("'x' is sharded by file (FILE: it reads files) but has 1 file(s) for 2 "
                      "workers", None),
    "dtype": ("the model's dtype policy differs between workers (worker 0: float32, worker 1: "
              "mixed_bfloat16)", None),
    "shared_cache": (f"'x' caches to '{preflight_workloads.SHARED_CACHE}' on workers 0, 1 of "
                     "host ", None),
}
THREADS = "host "


@pytest.fixture(scope="module")
def cases_run():
    return run_cluster(preflight_workloads.cases, 2, kwargs={"names": list(CASES)},
                       env={"TF_NUM_INTRAOP_THREADS": "2"}, timeout=240).assert_ok()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_mistake_is_reported_before_the_first_step(cases_run):
    """TF_NUM_INTRAOP_THREADS=2 on a 2-core machine for 2 workers: every report also
    names the oversubscription."""
    chief, other = cases_run.results
    for case, (error, warning) in CASES.items():
        got = chief[case]
        if error is not None:
            assert error in (got["error"] or ""), (case, got)
            assert other[case]["error"] == got["error"], "the same error on every worker"
        else:
            assert got["error"] is None, (case, got)
            [report] = got["warnings"]
            assert warning in report, (case, report)
            assert "4 compute threads in all on 2 cores" in report, report
            assert "TF_NUM_INTRAOP_THREADS=1" in report
            assert other[case]["warnings"] == [], "one report, on the chief"
        others = [w for c, (e, w) in CASES.items() if c != case for w in (e, w) if w]
        text = (got["error"] or "") + "".join(got["warnings"])
        assert not [w for w in others if w in text], (case, text)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_call_made_on_the_chief_alone_names_the_collective_and_the_fix(cases_run):
    """After the cases, worker 1 returns and the chief evaluates alone (a script's `if
    is_chief: model.evaluate(...)`): a copy of the model built outside the strategy's scope
    evaluates; the model itself fails at once, saying that every worker must call evaluate
    and how to evaluate on one worker."""
    result = cases_run.results[0]["chief_only_evaluate"]
    assert isinstance(result["copy"], float), result
    assert "lost w1 at 'keras_compat.preflight.evaluate'" in (result["error"] or ""), result
    assert "`evaluate` is a collective call: every worker must make it" in result["error"]
    assert "keras.models.clone_model" in result["error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_built_outside_the_scope_is_refused_before_training_alone(cases_run):
    """Measured before: on 2 workers a model built without `strategy.scope()` trained alone on
    each (different weights, exit 0). Every worker now refuses its `fit` before a step; a
    model built in a `OneDeviceStrategy`'s scope (meant for one worker) still trains."""
    for result in (r["outside_scope"] for r in cases_run.results):
        assert "the model was built outside strategy.scope()" in (result["error"] or ""), result
        assert "with strategy.scope():" in result["error"] and "OneDeviceStrategy" in result["error"]
        assert result["trained_before_error"] == 0
        assert result["local_steps"] > 0


def test_verdict_without_cluster():
    same = {"host": "h", "cores": 4, "threads": 2, "dtype": "float32", "errors": [],
            "notes": ["n"]}
    assert preflight.verdict([same, same]) == ([], ["n"]), "fits the host; notes deduplicated"
    one_thread = {**same, "cores": 2, "threads": 1, "notes": []}
    assert preflight.verdict([one_thread] * 3) == ([], []), \
        "more tasks than cores at one thread each: nothing a thread cap could fix"
    cached = {**one_thread, "caches": {"x": ["/data/cache"]}}
    [shared], _ = preflight.verdict([cached, one_thread, cached])
    assert "'x' caches to '/data/cache' on workers 0, 2 of host h" in shared
    assert preflight.verdict([cached, {**cached, "host": "other"}]) == ([], []), \
        "the same path on two hosts: local disks, or a shared one we cannot tell"
    own = {**one_thread, "caches": {"x": ["/data/cache-w1"]}}
    assert preflight.verdict([cached, own]) == ([], [])
