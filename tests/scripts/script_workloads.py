"""Worker functions: run the third-party scripts of tests/scripts/ as `python SCRIPT` would."""

from __future__ import annotations

import hashlib
import runpy
import sys
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent


def run_script(script: str, args: list[str] | None = None, seed: int | None = 0) -> dict:
    """Runs `tests/scripts/<script>` in this process as `python <script> ARGS` would
    (`__main__`, its directory first on `sys.path`), and records what its models'
    `fit` and `evaluate` calls returned.

    Args:
        script: the script's path under tests/scripts/.
        args: its command-line arguments.
        seed: `keras.utils.set_random_seed(seed)` before the script, as a user seeding
            the run would (identical initial weights, shuffles and augmentation in
            every process); None leaves every process its own random draws.

    Returns:
        `{"calls": [[method, model name, history or result], ...], "weights": {model
        name: [sha256 of all its weights, [each weight's sum]]}}`: the script's calls
        in order (not `fit`'s own validation), histories as `History.history` dicts;
        the weights (non-trainable included) of every model it called, at its end.
    """
    return _run(script, args, seed)[0]


def text_classification_against_one_process() -> dict:
    """`run_script` of the seeded text classification script, then the test set
    evaluated in this process alone (TensorFlow's default strategy, a copy of the
    trained model): Keras's one-process metrics for the same weights.

    Returns:
        `run_script`'s result and `"one_process_evaluate"`: `[loss, accuracy]`.
    """
    import keras

    result, script_globals = _run("text_classification_from_scratch.py", None, 0)
    trained = script_globals["model"]
    model = keras.models.clone_model(trained)
    model.set_weights(trained.get_weights())
    model.compile(loss="binary_crossentropy", metrics=["accuracy"])
    result["one_process_evaluate"] = model.evaluate(script_globals["test_ds"], verbose=0)
    return result


def _run(script: str, args: list[str] | None, seed: int | None) -> tuple[dict, dict[str, Any]]:
    """`run_script`'s result and the script's globals."""
    import keras
    import numpy as np

    if seed is not None:
        keras.utils.set_random_seed(seed)
    calls: list = []
    models: dict = {}
    depth = [0]
    path = SCRIPTS / script
    own = {name: vars(keras.Model).get(name) for name in ("fit", "evaluate")}

    def recording(name: str):
        def method(self, *args, **kwargs):
            # Looked up at call time: disttrain patches Keras's trainer class, below Model.
            depth[0] += 1
            try:
                result = getattr(super(keras.Model, self), name)(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # the script's call, not fit's own validation
                calls.append([name, self.name, result.history if name == "fit" else result])
                models[self.name] = self
            return result

        return method

    for name in own:
        setattr(keras.Model, name, recording(name))
    sys.argv = [str(path), *(args or [])]
    sys.path.insert(0, str(path.parent))
    try:
        script_globals = runpy.run_path(str(path), run_name="__main__")
    finally:
        for name, original in own.items():
            if original is None:
                delattr(keras.Model, name)
            else:
                setattr(keras.Model, name, original)
    weights = {}
    for name, model in models.items():
        values = [np.asarray(w) for w in model.get_weights()]
        digest = hashlib.sha256(b"".join(v.tobytes() for v in values)).hexdigest()
        weights[name] = [digest, [float(v.sum()) for v in values]]
    return {"calls": calls, "weights": weights}, script_globals
