"""The one check that TensorFlow and Keras are installed, made before disttrain imports them.

TensorFlow is not a core dependency of disttrain: it comes from an extra (`[tf]`,
`[cpu]`, `[gpu]`) or is already in the environment (`tensorflow-cpu`,
`tensorflow[and-cuda]`, `tf-nightly`), so that installing disttrain never pulls a
second TensorFlow. `import disttrain`, `disttrain.cluster`, `disttrain.storage` and
`launch` work without it; the modules that need it (`disttrain.distribute`, behind
`disttrain.strategy()`, and `disttrain.callbacks`) call `require_tensorflow` before
their first TensorFlow or Keras import, so a missing install fails with the fix
instead of a bare `ModuleNotFoundError` from deep inside Keras.
"""

from __future__ import annotations

import importlib.util
import sys

from disttrain.errors import MissingDependencyError

INSTALL_FIX = (
    'pip install "disttrain[cpu]" (CPU-only TensorFlow), "disttrain[gpu]" '
    '(TensorFlow with CUDA) or "disttrain[tf]" (the default tensorflow wheel); '
    "or install your own TensorFlow >= 2.16 build (tensorflow-cpu, "
    "tensorflow[and-cuda], tf-nightly) beside plain disttrain"
)
"""How to install what `require_tensorflow` looks for; every such error ends with it."""

_REQUIRED = ("tensorflow", "keras")


def require_tensorflow(feature: str) -> None:
    """Raises a clear error when TensorFlow or Keras is not installed.

    Looks the packages up without importing them, so the check costs
    microseconds and imports nothing.

    Args:
        feature: what needs TensorFlow, named in the message
            (e.g. `"disttrain.strategy()"`).

    Raises:
        MissingDependencyError: `tensorflow` or `keras` cannot be imported in
            this interpreter; the message names the missing packages, the
            interpreter, and the install command.

    Example:

    >>> require_tensorflow("disttrain.strategy()")  # silent when TensorFlow is installed
    """
    missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"{feature} needs TensorFlow >= 2.16 with Keras 3, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed for {sys.executable}. "
            f"Fix: {INSTALL_FIX}."
        )
