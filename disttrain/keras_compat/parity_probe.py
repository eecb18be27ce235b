"""The parity probe: inside a process of `python -m disttrain.check parity`, capture the weights.

`DISTTRAIN_PARITY_DIR` (set by the check) makes the `call_checks` hook add a callback
to `fit` that, after `DISTTRAIN_PARITY_STEPS` training steps (or at the end of the
first `fit`, if shorter), syncs BatchNormalization statistics, saves the model's
weights and the weights it started from under that directory, and ends the process.
The check (`disttrain/check/parity.py`) compares what the processes saved. See
`docs/parity.md`.

Example:

```
DISTTRAIN_PARITY_DIR=/tmp/p DISTTRAIN_PARITY_STEPS=5 python train.py   # what the check runs
```
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

ENV_DIR = "DISTTRAIN_PARITY_DIR"
"""Where each process of a parity run writes its weights (set by the check)."""
ENV_STEPS = "DISTTRAIN_PARITY_STEPS"
"""After how many training steps the weights are captured (set by the check)."""

DEFAULT_STEPS = 5


def attach(model: Any, call: str, arguments: dict[str, Any]) -> None:
    """Adds the capturing callback to a `fit` when this process is part of a parity run.

    Called by disttrain's `fit` hook (`keras_compat.call_checks`) with the call's bound
    arguments, which it updates; a no-op unless `DISTTRAIN_PARITY_DIR` is set.

    Args:
        model: the model about to train.
        call: `"fit"`, `"evaluate"` or `"predict"` (only `fit` captures).
        arguments: the call's bound arguments (`callbacks` gets the capturing callback
            last: appended to a given `CallbackList`, else a new list).
    """
    import keras

    directory = os.environ.get(ENV_DIR)
    if not directory or call != "fit":
        return
    capture = _capture_callback(directory, int(os.environ.get(ENV_STEPS, DEFAULT_STEPS)))
    given = arguments.get("callbacks")
    if isinstance(given, keras.callbacks.CallbackList):
        given.callbacks.append(capture)
    elif isinstance(given, (list, tuple)):
        arguments["callbacks"] = [*given, capture]
    else:
        arguments["callbacks"] = ([] if given is None else [given]) + [capture]


def _capture_callback(directory: str, steps: int):
    import keras

    class CaptureWeights(keras.callbacks.Callback):
        """Saves the weights after `steps` training steps (or at train end), then exits."""

        def __init__(self):
            super().__init__()
            self._steps, self._initial = 0, None

        def on_train_begin(self, logs=None):
            self._initial = _weights(self.model)

        def on_train_batch_end(self, batch, logs=None):
            self._steps += 1
            if self._steps >= steps:
                self._capture()

        def on_train_end(self, logs=None):
            self._capture()

        def _capture(self):
            from disttrain import coordination
            from disttrain.keras_compat.synced_batchnorm_statistics import (
                sync_batchnorm_statistics,
            )

            sync_batchnorm_statistics(self.model)
            coord = coordination.get()
            final = _weights(self.model)
            import numpy as np

            np.savez(os.path.join(directory, f"worker-{coord.rank}.npz"),
                     **{f"initial/{k}": v for k, v in self._initial.items()},
                     **{f"final/{k}": v for k, v in final.items()})
            with open(os.path.join(directory, f"worker-{coord.rank}.json"), "w") as f:
                json.dump({"steps": self._steps, "order": list(final),
                           "causes": by_design_causes(self.model)}, f)
            coord.barrier("disttrain.check.parity")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    return CaptureWeights()


def _weights(model: Any) -> dict[str, Any]:
    """The model's floating-point variables by path (model order)."""
    import numpy as np

    weights: dict[str, Any] = {}
    for index, variable in enumerate(model.weights):
        value = np.asarray(variable.numpy())
        if np.issubdtype(value.dtype, np.floating):
            key = variable.path if variable.path not in weights else f"{variable.path}#{index}"
            weights[key] = value.astype("float64")
    return weights


def by_design_causes(model: Any) -> list[str]:
    """What in `model` makes N workers differ from one process by design.

    Args:
        model: a built Keras model.

    Returns:
        One sentence per cause seen: BatchNormalization without `synchronized=True`,
        a custom `train_step`, layers that draw random numbers.

    Example:

    ```python
    by_design_causes(model)   # ["BatchNormalization 'bn' without synchronized=True: ..."]
    ```
    """
    import keras

    from disttrain.keras_compat import detection

    layers = list(model._flatten_layers(include_self=False))
    causes = []
    unsynced = [layer.name for layer in layers
                if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized]
    if unsynced:
        causes.append(
            f"BatchNormalization {', '.join(map(repr, unsynced))} without synchronized=True: "
            "each replica normalizes with its own part of the batch (as in every data-parallel "
            "framework), one process with the whole batch. Fix for parity: "
            "BatchNormalization(synchronized=True).")
    if type(model).train_step is not detection.trainer_class().train_step:
        causes.append(
            f"{type(model).__name__} has its own train_step: it runs once per replica on its "
            "part of the batch, and a loss averaged by hand (tf.reduce_mean, keras.ops.mean) "
            "is then counted once per replica (tf.distribute's scaling rule). Fix for parity: "
            "divide the summed per-sample loss by the global batch size "
            "(tf.nn.compute_average_loss), or use compile()'s loss.")
    random = [layer.name for layer in layers if hasattr(layer, "seed_generator")]
    if random:
        causes.append(
            f"layers {', '.join(map(repr, random))} draw random numbers (dropout, noise, "
            "augmentation): each replica draws its own, so the weights differ from one "
            "process's even with a global seed. For the check, set their rate to 0.")
    return causes
