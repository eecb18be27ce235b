"""Worker function for tests/keras_compat/test_patch_register.py: every patch installed in one process."""

from __future__ import annotations

import sys
from typing import Any


def _functions_of_keras_and_tensorflow() -> dict[tuple[int, str], tuple[Any, Any]]:
    """(id(owner), attribute) → (owner, value) for every callable attribute of every
    imported Keras or TensorFlow module and of the classes each defines."""
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("keras", "tensorflow")):
            continue
        owners = [module] + [value for value in list(vars(module).values())
                             if isinstance(value, type) and value.__module__ == name]
        for owner in owners:
            for attr, value in list(vars(owner).items()):
                if callable(value) or isinstance(value, (staticmethod, classmethod)):
                    found[(id(owner), attr)] = (owner, value)
    return found


def install_everything(timing_file: str) -> dict[str, Any]:
    """Installs every patch disttrain makes (the fixes, the stop agreement, the call
    checks, gradient compression, the step-timing recorder, the mid-epoch skip's
    wrapper), compares every Keras/TensorFlow function before and after, then
    installs everything twice more.

    Returns:
        `table`: the register as Markdown; `unregistered`: replaced attributes the
        register does not list; `missing`: registered ones that were not replaced;
        `chains`: per replaced attribute, who wraps it, outermost first (or why the
        chain is broken); `patches`: how many patches the first install made;
        `after_reinstalls`: how many there are after the two more installs.
    """
    import keras.src.backend.tensorflow.optimizer  # noqa: F401 - patched below
    import keras.src.callbacks.callback_list  # noqa: F401 - patched below

    from disttrain import keras_compat
    from disttrain.keras_compat import (
        _patch,
        call_checks,
        gradient_compression,
        persistent_epoch_iterator,
        step_timing_recorder,
        stop_agreement,
    )

    before = _functions_of_keras_and_tensorflow()
    owners = {owner_id for owner_id, _ in before}

    def install() -> None:
        keras_compat.apply()
        gradient_compression.install("bf16")
        step_timing_recorder.install(timing_file)
        persistent_epoch_iterator.skip_batches_of_next_epoch(0)

    install()
    replaced = {f"{_patch.qualified_name(owner)}.{attr}"
                for (owner_id, attr), (owner, value) in _functions_of_keras_and_tensorflow().items()
                if owner_id in owners and before.get((owner_id, attr), (None, None))[1] is not value}
    registered = {patch.target: patch for patch in keras_compat.patches()}
    chains = {}
    for target, patch in registered.items():
        try:
            chains[target] = _patch.chain(patch.owner, patch.attr)
        except LookupError as e:
            chains[target] = str(e)
    patches = len(keras_compat.patches())
    for _ in range(2):
        for fix in keras_compat._FIXES:
            fix.install()
        stop_agreement.install()
        call_checks.install()
        install()
    return {"table": _patch.table(), "unregistered": sorted(set(replaced) - set(registered)),
            "missing": sorted(set(registered) - replaced), "chains": chains,
            "patches": patches, "after_reinstalls": len(keras_compat.patches())}
