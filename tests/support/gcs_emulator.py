"""A real local GCS server (`gcp-storage-emulator`) for tests, run as a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
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


@contextlib.contextmanager
def running_emulator(
    bucket: str, log_path: str, start_timeout: float = 30.0
) -> Iterator[GcsEmulator]:
    """Starts `gcp-storage-emulator` on a free loopback port; stops it by pid on exit.

    Raises:
        RuntimeError: when the server exits or its bucket is not served within
            `start_timeout` seconds (the message includes the server's log).
    """
    port = portpicker.pick_unused_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
             "--port", str(port), "--default-bucket", bucket, "--in-memory"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not _bucket_ready(endpoint, bucket):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    output = f.read()
                raise RuntimeError(
                    f"gcp-storage-emulator did not serve bucket {bucket!r} at {endpoint} "
                    f"within {start_timeout:.0f} s (exit code {proc.poll()}):\n{output}"
                )
            time.sleep(0.1)
        yield GcsEmulator(endpoint=endpoint, bucket=bucket, log_path=log_path, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
