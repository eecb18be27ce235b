"""Several independent test cases in one cluster: a worker runs each case in turn, catching
its error, and each test asserts on its own case's result.

A cluster start costs more than most cases, so a test module whose cases need the same
worker count, environment and Keras fixes runs them all in one `run_cluster` call (a
module-scoped fixture). A case that raises fails exactly its own test, with every worker's
traceback. The outcomes are written to the worker's result file after every case, so when
a case hangs or kills its worker, the cases finished before it still pass or fail on their
own and the tests of the unfinished ones fail with the cluster's report.

Example:

```python
# x_workloads.py (worker side)
def shared(directory: str) -> dict:
    return run_cases({"fit": lambda: fit_case(directory), "evaluate": evaluate_case})

# test_x.py
@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    return run_cluster(x_workloads.shared, 2, kwargs={"directory": ...}, timeout=300)

def test_fit(shared_run):
    chief, other = case_results(shared_run, "fit")
```
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from disttrain.testing import write_result


def run_cases(cases: Mapping[str, Callable[[], Any]]) -> dict[str, dict[str, Any] | None]:
    """Worker side: runs every case in order, each caught on its own, each after
    `keras.backend.clear_session()` so that its layer and variable names are those of a
    new process (`dense`, not `dense_7`: results compare by variable path).

    Args:
        cases: case name -> a function taking no arguments that returns the case's
            JSON-serialisable result.

    Returns:
        `{name: {"result": ..., "error": None or the formatted traceback, "seconds": ...}}`,
        to return from the worker function. The same mapping, with None for the cases not
        finished yet, is written to the file `DISTTRAIN_TEST_RESULT` names before each case.
    """
    import keras

    outcomes: dict[str, dict[str, Any] | None] = dict.fromkeys(cases)
    for name, case in cases.items():
        write_result(outcomes)
        keras.backend.clear_session(free_memory=False)
        started = time.monotonic()
        result, error = None, None
        try:
            result = case()
        except Exception:  # noqa: BLE001 - reported to the case's own test
            error = traceback.format_exc()
        outcomes[name] = {"result": result, "error": error,
                          "seconds": round(time.monotonic() - started, 2)}
    return outcomes


def case_results(run: Any, name: str) -> list[Any]:
    """Test side: every worker's result of case `name` of a `run_cluster` of a `run_cases`
    workload, in rank order.

    Raises AssertionError naming the case when a worker did not finish it (with the
    cluster's report: a case before it or this one hung or ended the worker) or raised in
    it (with the tracebacks), or, once every worker finished every case, when a worker
    exited nonzero.

    Args:
        run: the `ClusterRun`.
        name: the case.
    """
    outcomes = [(result or {}).get(name) for result in run.results]
    unfinished = [rank for rank, outcome in enumerate(outcomes) if outcome is None]
    assert not unfinished, (f"case {name!r} did not finish on workers {unfinished}: exit codes "
                            f"{run.returncodes}\n{run.report()}")
    errors = [f"worker {rank}:\n{o['error']}" for rank, o in enumerate(outcomes) if o["error"]]
    assert not errors, f"case {name!r} raised\n" + "\n".join(errors)
    if all(None not in result.values() for result in run.results):
        run.assert_ok()
    return [o["result"] for o in outcomes]
