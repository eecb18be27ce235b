"""A model's weights as JSON-serialisable values, to compare workers, runs and files.

Three views, each named for what it holds (workers return them in their JSON results):

```
weight_lists(model)            # every variable of `model.weights`, in order: [[...], ...]
trainable_weight_lists(model)  # only `model.trainable_weights` (no BatchNorm statistics)
weights_by_path(model)         # {"dense/kernel": [...], ...}: compared by variable name
```
"""

from __future__ import annotations

import numpy as np


def weight_lists(model) -> list:
    """Every variable of `model.weights` (trainable and not), in order, as nested lists."""
    return [np.asarray(v.numpy()).tolist() for v in model.weights]


def trainable_weight_lists(model) -> list:
    """The trainable variables of `model`, in order, as nested lists."""
    return [np.asarray(v.numpy()).tolist() for v in model.trainable_weights]


def weights_by_path(model) -> dict:
    """Every variable of `model`, keyed by its path (e.g. `"dense/kernel"`), as nested lists."""
    return {v.path: np.asarray(v.numpy()).tolist() for v in model.weights}
