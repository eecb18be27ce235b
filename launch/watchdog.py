"""Kills the launcher's worker process groups when the launcher dies, however it dies.

`launch.procs` runs this file by path (`python -I -S watchdog.py`, standard
library only) in its own session, with a pipe on stdin whose write end only the
launcher holds. The launcher writes `+PGID` for each worker group it starts and
`-PGID` once that group is gone, and `*JSON` (a list of argv lists) for the commands
to run if it dies (`*[]` clears them; `launch.firewall` deletes its rules so). When
the pipe reaches end-of-file (the launcher exited, or was SIGKILLed) every group
still listed gets SIGKILL, then those commands run.

Each worker's own process also gets SIGKILL through PR_SET_PDEATHSIG; this
covers what that cannot: the worker's children (a shell script's commands, data
loader processes), which stay in the worker's process group.
"""

import json
import os
import signal
import subprocess
import sys


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    commands: list[list[str]] = []
    for line in sys.stdin.buffer:
        op = line[:1]
        if op == b"*":
            commands = json.loads(line[1:])
        elif op == b"+":
            groups.add(int(line[1:]))
        else:
            groups.discard(int(line[1:]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for argv in commands:
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue


if __name__ == "__main__":
    main()
