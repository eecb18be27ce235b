"""A real local GCS server (`gcp-storage-emulator`) run as a subprocess, for the tests (the
`gcs_server` fixture) and the storage-kill fault (`python -m benchmarks.faults`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import portpicker


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its endpoint, its pre-created bucket and its request log."""

    endpoint: str
    bucket: str
    log_path: str
    pid: int

    def log_size(self) -> int:
        with open(self.log_path, "rb") as f:
            return len(f.read())

    def requests_since(self, offset: int) -> list[str]:
        """HTTP request lines the server logged after byte `offset` of its log."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
        return [line for line in text.splitlines() if "HTTP/1." in line]


def _bucket_ready(endpoint: str, bucket: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_emulator(bucket: str, log_path: str, port: int | None = None,
                   data_dir: str | None = None, start_timeout: float = 30.0,
                   atomic_writes: bool = False) -> tuple[subprocess.Popen, GcsEmulator]:
    """Starts `gcp-storage-emulator` on 127.0.0.1 and waits until it serves `bucket`.

    Args:
        bucket: the bucket it creates (or finds in `data_dir`).
        log_path: its output, appended to.
        port: its port; default a free one.
        data_dir: where it keeps objects on disk (a restart on the same port and
            `data_dir` serves them again); default in memory.
        start_timeout: seconds to wait for the bucket.
        atomic_writes: with `data_dir`, the server replaces each file it keeps on
            disk whole (`serve_with_atomic_writes`), so a SIGKILL leaves every
            object and its own metadata (`.meta`) old or new, as GCS would;
            by default it rewrites them in place and a kill can truncate them.

    Returns:
        `(process, emulator)`; the caller stops the process.

    Raises:
        RuntimeError: when the server exits or its bucket is not served within
            `start_timeout` seconds (the message includes the server's log).
    """
    port = port or portpicker.pick_unused_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = [os.path.abspath(__file__)] if atomic_writes else ["-m", "gcp_storage_emulator"]
    command = [sys.executable, *server, "start", "--host", "127.0.0.1",
               "--port", str(port), "--default-bucket", bucket]
    env = dict(os.environ)
    if data_dir is None:
        command.append("--in-memory")
    else:
        env["STORAGE_BASE"] = data_dir
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + start_timeout
    while not _bucket_ready(endpoint, bucket):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            with open(log_path, encoding="utf-8", errors="replace") as f:
                output = f.read()
            raise RuntimeError(
                f"gcp-storage-emulator did not serve bucket {bucket!r} at {endpoint} "
                f"within {start_timeout:.0f} s (exit code {proc.poll()}):\n{output}"
            )
        time.sleep(0.1)
    return proc, GcsEmulator(endpoint=endpoint, bucket=bucket, log_path=log_path, pid=proc.pid)


def stop(proc: subprocess.Popen) -> None:
    """Terminates the emulator `proc` (kills it after 10 s) and reaps it."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_emulator(
    bucket: str, log_path: str, start_timeout: float = 30.0
) -> Iterator[GcsEmulator]:
    """Runs an in-memory emulator (`start_emulator`) on a free port; stops it on exit."""
    proc, server = start_emulator(bucket, log_path, start_timeout=start_timeout)
    try:
        yield server
    finally:
        stop(proc)


def serve_with_atomic_writes(argv: list[str]) -> None:
    """Runs `gcp_storage_emulator <argv>` with every file it keeps on disk written to a temp
    file beside it and renamed over it (`disttrain.storage.atomic_local_file`), instead of
    rewritten in place.

    The emulator keeps each object in a file and the whole bucket's metadata in
    one `.meta` file it rewrites on every change; SIGKILLed mid-rewrite, the
    restarted server fails reading a truncated `.meta` (`JSONDecodeError`) or
    serves a truncated object, damage a real object store never shows. A kill
    may leave a temp file (`.<name>.tmp-<hex>`), which the server never lists.

    Example: `python workloads/gcs_server.py start --port 9023 --default-bucket b`
    (`start_emulator(..., atomic_writes=True)` runs it so).
    """
    from pathlib import Path

    from gcp_storage_emulator import __main__ as emulator
    from gcp_storage_emulator.storage import _FileStore

    from disttrain.storage import atomic_local_file

    in_place = _FileStore.write_bytes

    def write_bytes(store: _FileStore, rel: str, content: bytes) -> None:
        if store._use_memory:
            in_place(store, rel, content)
            return
        path: Path = store._disk_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_local_file(str(path), suffix="") as tmp:
            Path(tmp).write_bytes(content)

    _FileStore.write_bytes = write_bytes
    emulator.main(argv)


if __name__ == "__main__":
    serve_with_atomic_writes(sys.argv[1:])
