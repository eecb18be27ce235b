import os

import pytest


@pytest.fixture(scope="session")
def callbacks_cluster(tmp_path_factory):
    """One 2-worker cluster running every scenario of tests/callbacks/shared_cluster_workloads.py,
    shared by the multi-worker tests of ReduceLROnPlateau, CSVLogger, TensorBoard,
    TerminateOnNaN and of callbacks beyond fit (tests/callbacks/test_callbacks_beyond_fit.py)."""
    from disttrain.testing import run_cluster
    from tests.callbacks import shared_cluster_workloads

    workdir = tmp_path_factory.mktemp("misc-callbacks")
    for name in ("csv", "tb_off", "tb_scratch"):
        os.makedirs(workdir / name)
        os.chmod(workdir / name, 0o755)
    (workdir / "blocker").write_text("a file where the CSV directory should be")
    run = run_cluster(shared_cluster_workloads.misc_callbacks, 2,
                      kwargs={"workdir": str(workdir)}, timeout=360).assert_ok()
    assert [r["rank"] for r in run.results] == [0, 1]
    return workdir, run.results
