"""recommended(): the callback stack, also without the optional tensorboard package."""

from __future__ import annotations

import json
import subprocess
import sys

from disttrain.testing import worker_env

WITHOUT_TENSORBOARD = """
import json, sys, warnings
sys.modules["tensorboard"] = None  # `import tensorboard` now raises ImportError
import disttrain.callbacks
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    stack = disttrain.callbacks.recommended(sys.argv[1])
print(json.dumps({"callbacks": [type(c).__name__ for c in stack],
                  "warnings": [str(w.message) for w in caught if "TensorBoard" in str(w.message)]}))
"""


def test_without_tensorboard_the_stack_leaves_it_out_with_one_warning(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARD, str(tmp_path / "run")],
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["callbacks"] == ["BackupAndRestore", "ReduceLROnPlateau", "EarlyStopping",
                                   "ModelCheckpoint", "CSVLogger", "TrainingReport"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "Fix: pip install tensorboard, or pass tensorboard=False" in result["warnings"][0]


def test_with_tensorboard_it_is_included(tmp_path):
    import disttrain.callbacks

    stack = disttrain.callbacks.recommended(str(tmp_path / "run"))
    assert [type(c).__name__ for c in stack][-1] == "TensorBoard"
