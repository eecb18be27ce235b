"""The examples in docstrings run: every `>>>` example of a module that needs no TensorFlow.

Modules whose examples need TensorFlow (they create strategies or patch Keras) are listed in
`NEEDS_TENSORFLOW`; every other module with an example runs here with TensorFlow blocked, so an
example that starts needing it fails instead of slowing the fast tier down.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO_ROOT

NEEDS_TENSORFLOW = {"disttrain._tf", "disttrain.keras_compat",
                    "disttrain.keras_compat.detection", "disttrain.resume.input_state",
                    "disttrain.keras_compat.gradients_reduced_before_apply"}
RUN_DOCTESTS = """\
import doctest, importlib, json, sys
sys.modules["tensorflow"] = None  # importing it raises ImportError
results = {}
for name in sys.argv[1:]:
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    results[name] = [result.attempted, result.failed]
print(json.dumps(results))
"""


def _modules_with_examples() -> list[str]:
    names = []
    for package in ("disttrain", "launch"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if ">>>" in path.read_text():
                parts = path.relative_to(REPO_ROOT).with_suffix("").parts
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_examples_of_modules_without_tensorflow_pass():
    names = [n for n in _modules_with_examples() if n not in NEEDS_TENSORFLOW]
    assert len(names) >= 10, names
    proc = subprocess.run([sys.executable, "-c", RUN_DOCTESTS, *names], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    failed = {name: counts for name, counts in results.items() if counts[1]}
    assert not failed, f"failing examples (attempted, failed): {failed}\n{proc.stdout[-3000:]}"
    assert all(attempted for attempted, _ in results.values()), results


def test_the_tensorflow_list_names_only_modules_with_examples():
    assert NEEDS_TENSORFLOW <= set(_modules_with_examples())
