import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# GCS JSON API calls that copy or move objects: disttrain's gs:// commits never use them.
RENAME_CALLS = ("rewriteTo", "copyTo", "moveTo", "compose")


CONTAINER_IMAGE = "localhost/disttrain:test-cpu"
OLDER_PAIR_TEST = "tests/keras_compat/test_versions.py::test_an_older_pair_passes_on_real_clusters"
_IMAGE = pytest.StashKey()
_OLDER_PAIR = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Starts the set-up that waits on the network in the background now (tests/support/background.py)
    and runs the container tests last, so the image build overlaps the CPU-bound tests."""
    if config.option.collectonly:
        return
    from tests.support.background import Background

    container = [item for item in items if item.get_closest_marker("container")]
    if container:
        items[:] = [item for item in items if item not in container] + container
        from tests.support import podman

        config.stash[_IMAGE] = Background(lambda: podman.prepare("cpu", CONTAINER_IMAGE))
    if any(item.nodeid == OLDER_PAIR_TEST for item in items):
        from tests.support import matrix
        from tests.keras_compat.test_versions import OLDER_PAIR

        pair = next(p for p in matrix.PAIRS if p.name == OLDER_PAIR)
        config.stash[_OLDER_PAIR] = Background(lambda: matrix.install(matrix.VENVS, pair))


@pytest.fixture(scope="session")
def container_image(request):
    """`tests.support.podman.Prepared`: the image built in the background since collection."""
    prepared = request.config.stash[_IMAGE].result(timeout=1800)
    if prepared.skip_reason:
        pytest.skip(prepared.skip_reason)
    return prepared


@pytest.fixture(scope="session")
def older_pair_venv(request):
    """The older pair's venv (tests.support.matrix), installed in the background since collection."""
    return request.config.stash[_OLDER_PAIR].result(timeout=900)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """One real GCS emulator server for the session (see workloads/gcs_server.py)."""
    from workloads.gcs_server import running_emulator

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


@pytest.fixture
def netns() -> None:
    """Skips the test, saying why, where network namespaces cannot be made."""
    from workloads.pod_network import netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
