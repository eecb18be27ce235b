"""`disttrain.strategy()` stays the function whatever is imported (one process)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_no_submodule_import_shadows_the_strategy_function():
    """Importing a submodule binds it on its package: a module named `strategy` would
    replace the function (`'module' object is not callable`). Every submodule is imported
    here, then `disttrain.strategy()` is called."""
    code = (
        "import importlib, pkgutil, types, disttrain\n"
        "for m in pkgutil.walk_packages(disttrain.__path__, 'disttrain.'):\n"
        "    importlib.import_module(m.name)\n"
        "import disttrain.distribute\n"
        "assert isinstance(disttrain.strategy, types.FunctionType), disttrain.strategy\n"
        "print(type(disttrain.strategy()).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "_DefaultDistributionStrategy"


def test_dir_lists_the_lazy_names():
    import disttrain
    import disttrain.callbacks

    assert {"strategy", "callbacks", "coordination", "storage", "keras_compat",
            "testing"} <= set(dir(disttrain))
    assert {"ModelCheckpoint", "EarlyStopping", "SyncStop", "recommended"} <= set(
        dir(disttrain.callbacks))
