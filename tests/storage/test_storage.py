"""Tests for disttrain.storage against real local files, memory:// and a real GCS emulator."""

from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings

import portpicker
import pytest

from disttrain import storage
from disttrain.errors import ClusterConfigError, StorageError
from tests.support import REPO_ROOT


# gcsfs falls back to copy + delete when asked to move; the emulator logs those calls.


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _temps(directory) -> list[str]:
    return glob.glob(os.path.join(directory, ".*.tmp-*"))


def _memory_dir() -> str:
    return f"memory://disttrain-tests/{uuid.uuid4().hex}"


# --- URL helpers -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_import_does_not_load_tensorflow_keras_or_gcsfs():
    code = (
        "import sys, disttrain.storage\n"
        "heavy = {'tensorflow', 'keras', 'gcsfs'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


@pytest.mark.timeout(10)
def test_url_to_fs_local_file_and_memory(tmp_path):
    fs, path = storage.url_to_fs(str(tmp_path / "a"))
    assert path == str(tmp_path / "a")
    assert storage.url_to_fs(f"file://{tmp_path}/a")[1] == str(tmp_path / "a")
    assert storage.url_to_fs("memory://x/y")[1] == "/x/y"
    assert storage.is_local(str(tmp_path)) and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("memory://x") and not storage.is_local("gs://bucket/x")


@pytest.mark.timeout(10)
def test_url_to_fs_unknown_protocol():
    with pytest.raises(StorageError, match=r"nosuchproto://x.*Fix:"):
        storage.url_to_fs("nosuchproto://x")


@pytest.mark.timeout(10)
def test_url_to_fs_missing_backend_names_the_package():
    if importlib.util.find_spec("adlfs") is not None:
        pytest.skip("adlfs is installed here")
    with pytest.raises(StorageError, match=r"az://container/x.*pip install adlfs"):
        storage.url_to_fs("az://container/x")


@pytest.mark.timeout(10)
def test_join():
    assert storage.join("gs://b/run/", "ckpt-1", "/m.keras") == "gs://b/run/ckpt-1/m.keras"
    assert storage.join("memory://", "a", "b") == "memory://a/b"
    assert storage.join("file:///", "tmp") == "file:///tmp"
    assert storage.join("/", "tmp", "x/") == "/tmp/x"
    assert storage.join("/tmp/run", "") == "/tmp/run"


# --- local atomic writes -----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_atomic_write_bytes_replaces_fully_and_creates_parents(tmp_path):
    dest = tmp_path / "new" / "deep" / "state.bin"
    storage.atomic_write_bytes(str(dest), b"x" * 1000)
    storage.atomic_write_bytes(str(dest), b"short")
    assert dest.read_bytes() == b"short"
    assert os.listdir(dest.parent) == ["state.bin"]
    assert _temps(dest.parent) == []


@pytest.mark.timeout(10)
def test_atomic_write_bytes_respects_umask(tmp_path):
    dest = tmp_path / "f"
    old = os.umask(0o022)
    try:
        storage.atomic_write_bytes(str(dest), b"x")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o644


@pytest.mark.timeout(10)
def test_atomic_upload_local_replaces_and_keeps_source(tmp_path):
    src = _write(tmp_path / "src.bin", b"new content")
    dest = tmp_path / "out" / "dest.bin"
    storage.atomic_write_bytes(str(dest), b"old content that is longer")
    storage.atomic_upload(src, f"file://{dest}")
    assert dest.read_bytes() == b"new content"
    assert os.path.exists(src)
    assert _temps(dest.parent) == []


@pytest.mark.timeout(10)
def test_atomic_upload_missing_source_names_it(tmp_path):
    with pytest.raises(StorageError, match=r"nope\.bin.*FileNotFoundError.*Fix: check that"):
        storage.atomic_upload(str(tmp_path / "nope.bin"), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


@pytest.mark.timeout(10)
def test_atomic_local_file_commits_on_success(tmp_path):
    dest = tmp_path / "ckpt" / "model.weights.h5"
    with storage.atomic_local_file(str(dest)) as tmp:
        assert tmp.endswith(".weights.h5")
        assert os.path.dirname(tmp) == str(dest.parent)
        assert not os.path.exists(tmp)
        _write(tmp, b"weights")
    assert dest.read_bytes() == b"weights"
    assert os.listdir(dest.parent) == ["model.weights.h5"]


@pytest.mark.timeout(10)
def test_atomic_local_file_explicit_suffix(tmp_path):
    with storage.atomic_local_file(str(tmp_path / "best"), suffix=".keras") as tmp:
        assert tmp.endswith(".keras")
        _write(tmp, b"k")
    assert (tmp_path / "best").read_bytes() == b"k"


@pytest.mark.timeout(10)
def test_atomic_local_file_exception_leaves_old_file(tmp_path):
    dest = tmp_path / "model.keras"
    dest.write_bytes(b"old model")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_local_file(str(dest)) as tmp:
            _write(tmp, b"half a new mod")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"old model"
    assert os.listdir(tmp_path) == ["model.keras"]


@pytest.mark.timeout(10)
def test_atomic_local_file_writer_out_of_space_is_a_storage_error_with_the_fix(tmp_path):
    dest = tmp_path / "model.keras"
    dest.write_bytes(b"old model")
    with pytest.raises(StorageError) as caught, storage.atomic_local_file(str(dest)) as tmp:
        _write(tmp, b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert repr(str(dest)) in message and "No space left on device" in message
    assert "Fix: free space on the destination" in message
    assert dest.read_bytes() == b"old model"
    assert os.listdir(tmp_path) == ["model.keras"]


@pytest.mark.timeout(10)
def test_atomic_local_file_remote_writer_out_of_space_points_at_local_staging():
    expected = "staging it in the local temp file.*Fix: free space in the local temp directory"
    with (pytest.raises(StorageError, match=expected),
          storage.atomic_local_file("memory://staging/model.keras")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not storage.exists("memory://staging/model.keras")


@pytest.mark.timeout(10)
def test_atomic_local_file_nothing_written(tmp_path):
    with pytest.raises(StorageError, match="nothing was written"):
        with storage.atomic_local_file(str(tmp_path / "model.keras")):
            pass
    assert os.listdir(tmp_path) == []


CRASH_WRITER = textwrap.dedent(
    """
    import sys
    from disttrain.storage import atomic_write_bytes
    dest, size = sys.argv[1], int(sys.argv[2])
    contents = [b"A" * size, b"B" * size]
    print("ready", flush=True)
    i = 0
    while True:
        atomic_write_bytes(dest, contents[i % 2])
        i += 1
    """
)


@pytest.mark.timeout(120)
def test_sigkill_during_atomic_writes_never_leaves_a_partial_file(tmp_path):
    size = 24 * 1024 * 1024
    contents = (b"A" * size, b"B" * size)
    dest = tmp_path / "big.bin"
    dest.write_bytes(contents[0])
    rng = random.Random()
    killed_mid_write = 0
    for _ in range(6):
        delay = rng.uniform(0.05, 0.5)
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(dest), str(size)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        data = dest.read_bytes()
        complete = data in contents
        assert complete, f"torn file after kill at {delay:.3f} s: {len(data)} bytes"
        leftovers = _temps(tmp_path)
        killed_mid_write += bool(leftovers)
        for path in leftovers:
            os.unlink(path)
    assert killed_mid_write, "no kill landed during a write; the test proved nothing"


# --- multi-file checkpoints --------------------------------------------------------------


def _sources(tmp_path, tag: str) -> dict[str, str]:
    src = tmp_path / f"src-{tag}"
    src.mkdir()
    return {
        "model.weights.h5": _write(src / "w.h5", f"weights-{tag}".encode() * 100),
        "optimizer/state.bin": _write(src / "o.bin", f"opt-{tag}".encode() * 10),
    }


@pytest.mark.timeout(10)
def test_commit_checkpoint_writes_manifest_and_files(tmp_path):
    ckpt = str(tmp_path / "run" / "ckpt-0001")
    files = _sources(tmp_path, "1")
    manifest = storage.commit_checkpoint(ckpt, files, {"epoch": 1, "val_loss": 0.5})
    assert storage.read_manifest(ckpt) == manifest
    assert manifest["metadata"] == {"epoch": 1, "val_loss": 0.5}
    for name, local in files.items():
        data = open(local, "rb").read()
        assert manifest["files"][name] == {
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert storage.read_bytes(storage.join(ckpt, name)) == data
    assert storage.is_committed(ckpt)
    assert sorted(storage.listdir(ckpt)) == sorted(
        [storage.MANIFEST_NAME, "model.weights.h5", "optimizer"]
    )
    assert _temps(ckpt) == []


@pytest.mark.timeout(10)
def test_is_committed_detects_missing_and_truncated_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert not storage.is_committed(str(ckpt))
    assert storage.read_manifest(str(ckpt)) is None
    storage.commit_checkpoint(str(ckpt), _sources(tmp_path, "1"), {})
    weights = ckpt / "model.weights.h5"
    full = weights.read_bytes()
    weights.write_bytes(full[:-1])
    assert not storage.is_committed(str(ckpt))
    weights.unlink()
    assert not storage.is_committed(str(ckpt))


@pytest.mark.timeout(10)
def test_commit_with_missing_source_keeps_old_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    old = storage.commit_checkpoint(ckpt, _sources(tmp_path, "old"), {"epoch": 1})
    files = {**_sources(tmp_path, "new"), "extra.bin": str(tmp_path / "missing.bin")}
    with pytest.raises(StorageError, match=r"missing\.bin.*FileNotFoundError"):
        storage.commit_checkpoint(ckpt, files, {"epoch": 2})
    assert storage.read_manifest(ckpt) == old
    assert storage.is_committed(ckpt)


@pytest.mark.timeout(10)
def test_commit_failing_midway_leaves_directory_uncommitted(tmp_path):
    ckpt = tmp_path / "ckpt"
    storage.commit_checkpoint(str(ckpt), _sources(tmp_path, "old"), {"epoch": 1})
    (ckpt / "clash").mkdir()
    (ckpt / "clash" / "keep").write_bytes(b"x")
    files = {**_sources(tmp_path, "new"), "clash": _write(tmp_path / "c.bin", b"c")}
    with pytest.raises(StorageError, match=r"clash.*Fix:"):
        storage.commit_checkpoint(str(ckpt), files, {"epoch": 2})
    assert storage.read_manifest(str(ckpt)) is None
    assert not storage.is_committed(str(ckpt))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["../escape", "/abs", "a//b", storage.MANIFEST_NAME, ""])
def test_commit_rejects_bad_names(tmp_path, name):
    src = _write(tmp_path / "s", b"s")
    with pytest.raises(StorageError, match="not a valid file name"):
        storage.commit_checkpoint(str(tmp_path / "ckpt"), {name: src}, {})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.timeout(10)
def test_json_round_trip_missing_and_invalid(tmp_path):
    url = str(tmp_path / "state.json")
    assert storage.read_json(url) is None
    storage.write_json(url, {"epoch": 3, "best": [0.1]})
    assert storage.read_json(url) == {"epoch": 3, "best": [0.1]}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StorageError, match=r"bad\.json.*not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / storage.MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(StorageError, match="not a disttrain manifest"):
        storage.read_manifest(str(tmp_path / "ckpt"))


# --- probe, listing, deletes -------------------------------------------------------------


@pytest.mark.timeout(10)
def test_probe_writable_leaves_nothing(tmp_path):
    storage.probe_writable(str(tmp_path / "dest"))
    assert os.listdir(tmp_path / "dest") == []


@pytest.mark.timeout(10)
def test_probe_writable_under_a_regular_file_fails_clearly(tmp_path):
    blocker = _write(tmp_path / "a-file", b"x")
    url_dir = os.path.join(blocker, "ckpt")
    with pytest.raises(StorageError) as info:
        storage.probe_writable(url_dir)
    message = str(info.value)
    assert f"destination {url_dir!r} is not writable: NotADirectoryError" in message
    assert "Fix: a file and a directory clash" in message
    assert isinstance(info.value.__cause__, NotADirectoryError)


@pytest.mark.timeout(10)
def test_probe_writable_sysfs_fails_even_for_root():
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no Linux sysfs here")
    with pytest.raises(StorageError, match=r"'/sys' is not writable: .*check the permissions"):
        storage.probe_writable("/sys")


@pytest.mark.timeout(10)
def test_probe_writable_read_only_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match=r"is not writable: PermissionError.*credentials"):
            storage.probe_writable(str(ro))
    finally:
        ro.chmod(0o755)


@pytest.mark.timeout(10)
def test_listdir_exists_remove(tmp_path):
    run = str(tmp_path / "run")
    assert storage.listdir(run) == []
    storage.atomic_write_bytes(storage.join(run, "ckpt-1", "a"), b"a")
    storage.atomic_write_bytes(storage.join(run, "b.txt"), b"b")
    assert storage.listdir(run) == ["b.txt", "ckpt-1"]
    assert storage.exists(storage.join(run, "ckpt-1"))
    storage.remove(storage.join(run, "ckpt-1"), recursive=True)
    storage.remove(storage.join(run, "b.txt"))
    storage.remove(storage.join(run, "never-there"))
    assert storage.listdir(run) == []
    assert not storage.exists(storage.join(run, "b.txt"))


# --- scratch directories -----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_scratch_dir_is_per_run_and_worker(tmp_path):
    a = storage.scratch_dir("run-1", "chief", base=str(tmp_path))
    b = storage.scratch_dir("run-1", "w1", base=str(tmp_path))
    assert a == str(tmp_path / "run-1" / f"chief-{os.getpid()}")
    assert a != b and os.path.isdir(a) and os.path.isdir(b)


@pytest.mark.timeout(10)
def test_scratch_default_base_and_removed_on_error():
    run_id = f"t-{uuid.uuid4().hex[:12]}"
    expected = os.path.join(
        tempfile.gettempdir(), "disttrain-scratch", run_id, f"w0-{os.getpid()}"
    )
    with pytest.raises(RuntimeError):
        with storage.scratch(run_id, "w0") as path:
            assert path == expected
            _write(os.path.join(path, "f"), b"x")
            raise RuntimeError("fail inside")
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))


@pytest.mark.timeout(10)
def test_scratch_rejects_bad_inputs(tmp_path):
    with pytest.raises(ClusterConfigError):
        storage.scratch_dir("../x", "w0", base=str(tmp_path))
    with pytest.raises(StorageError, match="worker label"):
        storage.scratch_dir("run", "w0/../..", base=str(tmp_path))
    with pytest.raises(StorageError, match="must be local"):
        storage.scratch_dir("run", "w0", base="gs://bucket/scratch")


# --- memory:// ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_memory_round_trip(tmp_path):
    run = _memory_dir()
    storage.probe_writable(run)
    storage.atomic_write_bytes(storage.join(run, "a.bin"), b"one")
    storage.atomic_write_bytes(storage.join(run, "a.bin"), b"two")
    assert storage.read_bytes(storage.join(run, "a.bin")) == b"two"
    storage.atomic_upload(_write(tmp_path / "u", b"up"), storage.join(run, "u.bin"))
    with storage.atomic_local_file(storage.join(run, "m.keras")) as tmp:
        assert tmp.endswith(".keras")
        _write(tmp, b"model")
    assert not os.path.exists(tmp)
    ckpt = storage.join(run, "ckpt-1")
    storage.commit_checkpoint(ckpt, _sources(tmp_path, "m"), {"epoch": 1})
    assert storage.is_committed(ckpt)
    assert storage.listdir(run) == ["a.bin", "ckpt-1", "m.keras", "u.bin"]
    storage.remove(ckpt, recursive=True)
    assert not storage.is_committed(ckpt)
    assert storage.read_bytes(storage.join(run, "m.keras")) == b"model"


# --- gs:// on a real local GCS emulator --------------------------------------------------


@pytest.mark.timeout(60)
def test_gcs_round_trip(gcs, tmp_path):
    start = time.monotonic()
    run = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
    storage.probe_writable(run)
    assert storage.listdir(run) == []
    storage.atomic_write_bytes(storage.join(run, "state.bin"), b"old")
    storage.atomic_write_bytes(storage.join(run, "state.bin"), b"new")
    assert storage.read_bytes(storage.join(run, "state.bin")) == b"new"
    storage.atomic_upload(_write(tmp_path / "u", b"uploaded"), storage.join(run, "u.bin"))
    assert storage.read_bytes(storage.join(run, "u.bin")) == b"uploaded"
    with storage.atomic_local_file(storage.join(run, "model.weights.h5")) as tmp:
        assert tmp.endswith(".weights.h5")
        _write(tmp, b"weights")
    assert storage.read_bytes(storage.join(run, "model.weights.h5")) == b"weights"
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(storage.join(run, "model.weights.h5")) as tmp:
            _write(tmp, b"torn")
            raise RuntimeError("fail")
    assert storage.read_bytes(storage.join(run, "model.weights.h5")) == b"weights"

    ckpt = storage.join(run, "ckpt-0001")
    assert storage.read_manifest(ckpt) is None and not storage.is_committed(ckpt)
    manifest = storage.commit_checkpoint(ckpt, _sources(tmp_path, "g"), {"epoch": 1})
    assert storage.read_manifest(ckpt) == manifest
    assert storage.is_committed(ckpt)
    storage.atomic_write_bytes(storage.join(ckpt, "model.weights.h5"), b"truncated")
    assert not storage.is_committed(ckpt)

    storage.write_json(storage.join(run, "state.json"), {"epoch": 1})
    assert storage.read_json(storage.join(run, "state.json")) == {"epoch": 1}
    assert storage.listdir(run) == [
        "ckpt-0001", "model.weights.h5", "state.bin", "state.json", "u.bin",
    ]
    assert storage.exists(storage.join(run, "u.bin"))
    storage.remove(ckpt, recursive=True)
    storage.remove(storage.join(run, "u.bin"))
    storage.remove(storage.join(run, "never-there"))
    assert storage.listdir(run) == ["model.weights.h5", "state.bin", "state.json"]
    assert not storage.exists(storage.join(run, "u.bin"))
    assert time.monotonic() - start < 20, "a gs:// operation was slow: a rename fallback?"


@pytest.mark.timeout(30)
def test_gcs_reads_see_writes_of_other_processes(gcs, tmp_path):
    run = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
    fs, _ = storage.url_to_fs(run)
    other = type(fs)(endpoint_url=gcs.endpoint, token="anon", skip_instance_cache=True)
    ckpt = storage.join(run, "ckpt")
    storage.commit_checkpoint(ckpt, _sources(tmp_path, "p"), {})
    assert storage.listdir(run) == ["ckpt"] and storage.is_committed(ckpt)
    other.pipe(f"{run}/late.bin", b"late")
    other.rm(f"{ckpt}/optimizer/state.bin")
    assert storage.listdir(run) == ["ckpt", "late.bin"]
    assert storage.exists(storage.join(run, "late.bin"))
    assert not storage.exists(storage.join(ckpt, "optimizer", "state.bin"))
    assert not storage.is_committed(ckpt)


@pytest.mark.timeout(30)
def test_gcs_emulator_host_without_scheme(gcs, monkeypatch):
    monkeypatch.setenv(storage.ENV_STORAGE_EMULATOR_HOST, gcs.endpoint.removeprefix("http://"))
    url = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/x.json"
    storage.write_json(url, [1])
    assert storage.read_json(url) == [1]


@pytest.mark.timeout(30)
def test_gcs_large_object_is_one_upload(gcs, tmp_path):
    url = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/big.bin"
    data = os.urandom(12 * 1024 * 1024)
    storage.atomic_upload(_write(tmp_path / "big", data), url)
    assert hashlib.sha256(storage.read_bytes(url)).digest() == hashlib.sha256(data).digest()


@pytest.mark.timeout(30)
def test_gcs_missing_bucket_is_a_clear_error(gcs):
    start = time.monotonic()
    url = "gs://no-such-bucket-disttrain/run/state.bin"
    with pytest.raises(StorageError, match=r"no-such-bucket-disttrain.*create it"):
        storage.atomic_write_bytes(url, b"x")
    with pytest.raises(StorageError, match=r"not writable: .*create it"):
        storage.probe_writable("gs://no-such-bucket-disttrain/run")
    with pytest.raises(StorageError, match=r"reading 'gs://no-such-bucket-disttrain"):
        storage.read_bytes(url)
    assert storage.read_json(url) is None
    assert time.monotonic() - start < 10


@pytest.mark.timeout(10)
def test_gcs_manifest_is_created_after_every_file(gcs, tmp_path):
    ckpt = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/ckpt"
    manifest = storage.commit_checkpoint(ckpt, _sources(tmp_path, "order"), {})
    fs, path = storage.url_to_fs(ckpt)
    generation = {
        name: int(fs.info(f"{path}/{name}")["generation"])
        for name in [*manifest["files"], storage.MANIFEST_NAME]
    }
    last = generation.pop(storage.MANIFEST_NAME)
    assert all(g < last for g in generation.values()), generation


@pytest.fixture
def ftp_server(tmp_path):
    """A real FTP server (pyftpdlib) on a free loopback port, serving tmp_path/ftp."""
    root = tmp_path / "ftp"
    root.mkdir()
    port = portpicker.pick_unused_port()
    code = (
        "import sys; from pyftpdlib.authorizers import DummyAuthorizer; "
        "from pyftpdlib.handlers import FTPHandler; from pyftpdlib.servers import FTPServer; "
        "a = DummyAuthorizer(); a.add_user('u', 'p', sys.argv[1], perm='elradfmw'); "
        "h = FTPHandler; h.authorizer = a; FTPServer(('127.0.0.1', int(sys.argv[2])), h)"
        ".serve_forever()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no FTP server"
                time.sleep(0.05)
        yield f"ftp://u:p@127.0.0.1:{port}", root
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.timeout(60)
def test_backends_that_write_in_place_warn_once(ftp_server):
    url, root = ftp_server
    with pytest.warns(UserWarning, match="ftp:// writes in place"):
        storage.atomic_write_bytes(f"{url}/run/a.bin", b"a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        storage.atomic_write_bytes(f"{url}/run/b.bin", b"b")
    assert (root / "run" / "a.bin").read_bytes() == b"a"
    assert (root / "run" / "b.bin").read_bytes() == b"b"


def test_a_private_local_copy_keeps_its_content_when_the_file_is_replaced_or_deleted(tmp_path):
    path = str(tmp_path / "m-1.keras")
    storage.atomic_write_bytes(path, b"one")
    with storage.local_copy(path, private=True) as local:
        assert local != path and local.endswith(".keras")
        storage.atomic_write_bytes(path, b"two")
        os.remove(path)
        with open(local, "rb") as f:
            assert f.read() == b"one"
    assert not os.path.exists(local)
    with pytest.raises(StorageError, match="m-1.keras' failed: no such file"):
        with storage.local_copy(path, private=True):
            pass


@pytest.mark.parametrize("durable", [True, False])
def test_a_staged_file_durable_or_not_commits_whole(tmp_path, monkeypatch, durable):
    """durable=False (the multi-worker `model.save` of keras_compat) renames without the
    fsyncs: the file is committed whole either way, with no temp file left."""
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"old")
    staged = storage.StagedFile(str(path), durable=durable)
    try:
        assert staged.path.endswith(".weights.h5") and os.path.dirname(staged.path) == str(tmp_path)
        with open(staged.path, "wb") as f:
            f.write(b"new" * 1000)
        assert path.read_bytes() == b"old", "the destination changes only at the commit"
        staged.commit()
    finally:
        staged.discard()
    assert path.read_bytes() == b"new" * 1000
    assert os.listdir(tmp_path) == ["model.weights.h5"]
    assert bool(synced) is durable
