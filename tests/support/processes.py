"""Test-only process tools: read-only directory views and processes killed at random moments.

What a user testing multi-worker code needs is public in `disttrain.testing`;
these serve the tests that prove a process wrote nothing somewhere, and the tests that
SIGKILL a process at a random moment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time


def read_only_view(path: str | os.PathLike[str], command: list[str]) -> list[str]:
    """Wraps `command` to run in a private mount namespace where `path` is read-only.

    Any write under `path` then fails with EROFS, even as root: a proof that the
    process wrote nothing there. Needs root and util-linux `unshare`.
    """
    quoted = " ".join(shlex.quote(c) for c in command)
    p = shlex.quote(str(path))
    script = f"mount --bind {p} {p} && mount -o remount,bind,ro {p} && exec {quoted}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def can_make_read_only_views() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount --bind / / 2>/dev/null"], capture_output=True
    ) if os.geteuid() == 0 and shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def run_until_killed(command: list[str], env: dict[str, str], after: float) -> str:
    """Starts `command`, waits for it to print READY, SIGKILLs it `after` seconds later;
    returns its stderr (the test fails with it when READY never comes)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(after)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    return err
