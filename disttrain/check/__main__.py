"""`python -m disttrain.check SUBCOMMAND [ARGS]`: runs one of disttrain's checks of a user's script.

Example:

```
python -m disttrain.check parity -- python train.py
```
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {"parity": ("disttrain.check.parity",
                          "a few steps in one process and on 2 workers, weights compared")}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the subcommand's `main(args)`; prints the subcommands when none is given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS:
        listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())
        print(f"usage: python -m disttrain.check SUBCOMMAND [ARGS]\n\nsubcommands:\n{listing}",
              file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(SUBCOMMANDS[args[0]][0]).main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
