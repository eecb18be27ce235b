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
                   data_dir: str | None = None,
                   start_timeout: float = 30.0) -> tuple[subprocess.Popen, GcsEmulator]:
    """Starts `gcp-storage-emulator` on 127.0.0.1 and waits until it serves `bucket`.

    Args:
        bucket: the bucket it creates (or finds in `data_dir`).
        log_path: its output, appended to.
        port: its port; default a free one.
        data_dir: where it keeps objects on disk (a restart on the same port and
            `data_dir` serves them again); default in memory.
        start_timeout: seconds to wait for the bucket.

    Returns:
        `(process, emulator)`; the caller stops the process.

    Raises:
        RuntimeError: when the server exits or its bucket is not served within
            `start_timeout` seconds (the message includes the server's log).
    """
    port = port or portpicker.pick_unused_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
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
