"""The command-line convention every launcher shares: options, then `--`, then the command.

`python -m launch.local`, `python -m launch.k8s` and `python -m launch.entrypoint`
all take `[options] -- cmd [args ...]`; `split_command` is the one place that
splits such a line. Each launcher decides what a missing or empty command means.
"""

from __future__ import annotations

from collections.abc import Sequence

SEPARATOR = "--"


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Splits a launcher's arguments at the first `--`.

    Everything before it is the launcher's options; everything after it is the
    command, taken as is (a later `--` belongs to the command).

    Args:
        argv: the launcher's arguments, without the program name.

    Returns:
        `(options, command)`: `command` is None when there is no `--`, and an
        empty list when nothing follows it.

    Example:

    >>> split_command(["--workers", "2", "--", "python", "train.py", "--", "x"])
    (['--workers', '2'], ['python', 'train.py', '--', 'x'])
    >>> split_command(["--workers", "2"])
    (['--workers', '2'], None)
    """
    argv = list(argv)
    if SEPARATOR not in argv:
        return argv, None
    split = argv.index(SEPARATOR)
    return argv[:split], argv[split + 1:]
