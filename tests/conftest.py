import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# GCS JSON API calls that copy or move objects: disttrain's gs:// commits never use them.
RENAME_CALLS = ("rewriteTo", "copyTo", "moveTo", "compose")


CONTAINER_IMAGE = "localhost/disttrain:test-cpu"


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Runs the container tests last and starts their image build now, in the background: the
    build waits mostly on the network, so it overlaps the CPU-bound tests before them."""
    container = [item for item in items if item.get_closest_marker("container")]
    if not container or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in container] + container
    from tests import podman

    config.stash[_BUILD] = podman.BackgroundBuild(tf_extra="cpu", tag=CONTAINER_IMAGE)


_BUILD = pytest.StashKey()


@pytest.fixture(scope="session")
def container_build(request):
    """The background build of docker/Dockerfile started at collection (tests/podman.py)."""
    build = request.config.stash.get(_BUILD, None)
    assert build is not None, "only tests marked `container` get the image"
    image = build.image(timeout=1800)
    if build.skip_reason:
        pytest.skip(build.skip_reason)
    return build, image


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
    shared by the multi-worker tests of ReduceLROnPlateau, CSVLogger, TensorBoard and
    TerminateOnNaN."""
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
