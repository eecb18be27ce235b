"""`python -m disttrain.check [SUBCOMMAND] [ARGS]`: runs one of disttrain's checks.

Without a subcommand (or with options only) it runs `cluster`, the check to run
as the training command under a launcher.

Example:

```
python -m launch.local --workers 2 -- python -m disttrain.check --url /shared/ckpt
python -m disttrain.check parity -- python train.py
python -m disttrain.check gpu
```
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

DEFAULT = "cluster"
SUBCOMMANDS = {
    "cluster": ("disttrain.check.cluster",
                "under a launcher: the derived cluster, an all-reduce timed, the checkpoint URL "
                "probed (the default)"),
    "parity": ("disttrain.check.parity",
               "a few steps in one process and on 2 workers, weights compared"),
    "gpu": ("disttrain.check.gpu",
            "on a machine with 2+ GPUs: replica count, NCCL all-reduce bandwidth, fit over the "
            "GPUs against one device"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the subcommand's `main(args)`; `cluster` when none is given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]) or (args and not args[0].startswith("-")
                                             and args[0] not in SUBCOMMANDS):
        listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())
        print(f"usage: python -m disttrain.check [SUBCOMMAND] [ARGS]\n\nsubcommands:\n{listing}",
              file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    if not args or args[0].startswith("-"):
        args = [DEFAULT, *args]
    return importlib.import_module(SUBCOMMANDS[args[0]][0]).main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
