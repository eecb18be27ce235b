"""Kills the launcher's worker process groups when the launcher dies, however it dies.

`launch.procs` runs this file by path (`python -I -S watchdog.py`, standard
library only) in its own session, with a pipe on stdin whose write end only the
launcher holds. The launcher writes `+PGID` for each worker group it starts and
`-PGID` once that group is gone. When the pipe reaches end-of-file (the launcher
exited, or was SIGKILLed) every group still listed gets SIGKILL.

Each worker's own process also gets SIGKILL through PR_SET_PDEATHSIG; this
covers what that cannot: the worker's children (a shell script's commands, data
loader processes), which stay in the worker's process group.
"""

import os
import signal
import sys


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        op, pgid = line[:1], int(line[1:])
        if op == b"+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    main()
