"""Entry point of a harness worker: `python -m tests._worker module:function '{"kw": 1}'`.

Calls the function and writes its JSON-serialisable return value to the file
named by `DISTTRAIN_TEST_RESULT`, when set (the harness sets one per worker).
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> None:
    target, kwargs = sys.argv[1], json.loads(sys.argv[2])
    module_name, _, qualname = target.partition(":")
    fn = importlib.import_module(module_name)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    result = fn(**kwargs)
    path = os.environ.get("DISTTRAIN_TEST_RESULT")
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
