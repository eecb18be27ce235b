import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# GCS JSON API calls that copy or move objects: disttrain's gs:// commits never use them.
RENAME_CALLS = ("rewriteTo", "copyTo", "moveTo", "compose")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """One real GCS emulator server for the session (see tests/gcs_emulator.py)."""
    from tests.gcs_emulator import running_emulator

    log_path = str(tmp_path_factory.mktemp("gcs") / "emulator.log")
    with running_emulator("disttrain-test", log_path) as server:
        yield server


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """The emulator, selected for this process; fails the test if any gs:// write renamed."""
    from disttrain import storage

    monkeypatch.setenv(storage.ENV_STORAGE_EMULATOR_HOST, gcs_server.endpoint)
    offset = gcs_server.log_size()
    yield gcs_server
    calls = [r for r in gcs_server.requests_since(offset) if any(c in r for c in RENAME_CALLS)]
    assert calls == [], f"gs:// writes must be single uploads, never copies/moves: {calls}"


@pytest.fixture(scope="session")
def callbacks_cluster(tmp_path_factory):
    """One 2-worker cluster running every scenario of tests/shared_cluster_workloads.py,
    shared by the multi-worker tests of ReduceLROnPlateau, CSVLogger, TensorBoard,
    TerminateOnNaN and of callbacks beyond fit (tests/test_callbacks_beyond_fit.py)."""
    from disttrain.testing import run_cluster
    from tests import shared_cluster_workloads

    workdir = tmp_path_factory.mktemp("misc-callbacks")
    for name in ("csv", "tb_off", "tb_scratch"):
        os.makedirs(workdir / name)
        os.chmod(workdir / name, 0o755)
    (workdir / "blocker").write_text("a file where the CSV directory should be")
    run = run_cluster(shared_cluster_workloads.misc_callbacks, 2,
                      kwargs={"workdir": str(workdir)}, timeout=360).assert_ok()
    assert [r["rank"] for r in run.results] == [0, 1]
    return workdir, run.results
