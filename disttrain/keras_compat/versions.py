"""The Keras and TensorFlow versions disttrain supports, and what differs between them.

`check()` runs in `keras_compat.apply()`, so `disttrain.strategy()` refuses an
untested pair before any training, naming both versions, the range and the fix.
The range is what `python -m tests.support.matrix` runs on real clusters (its table is
in README); see `docs/keras_compat.md#supported-versions`.

Example:

>>> release("3.16.0.dev2026102704")
(3, 16)
"""

from __future__ import annotations

import re

from disttrain.errors import KerasCompatError

KERAS = ((3, 10), (3, 16))
"""Supported Keras releases (major, minor), both ends included; 3.16 is the nightly
whose release comes next (`keras-nightly`). Keras 3.9 and older create metric
variables without on-read synchronization: under multi-worker MWMS their epoch
logs are means of each worker's values, not the global metric."""
TENSORFLOW = ((2, 16), (2, 22))
"""Supported TensorFlow releases (major, minor), both ends included."""
STEP_RANGES_SINCE = (3, 11)
"""From this Keras on, the epoch iterator yields `(begin, end, iterator)` per call of
the step function; before, `(step, iterator)`."""


def release(version: str) -> tuple[int, int]:
    """The (major, minor) release of a version string such as `3.16.0.dev2026102704`.

    Raises:
        KerasCompatError: `version` does not start with `MAJOR.MINOR`.
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise KerasCompatError(f"Cannot read the release of version {version!r}. Fix: install "
                               f"released versions: {' '.join(requirements())}.")
    return int(match[1]), int(match[2])


def requirements() -> tuple[str, str]:
    """The supported range as pip requirements of keras and tensorflow."""
    return tuple(f"{name}>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"
                 for name, (low, high) in (("keras", KERAS), ("tensorflow", TENSORFLOW)))


def check(keras_version: str, tensorflow_version: str) -> None:
    """Raises unless both versions lie in the supported range.

    Args:
        keras_version: `keras.__version__`.
        tensorflow_version: `tf.__version__`.

    Raises:
        KerasCompatError: naming the installed versions, the range and the fix.
    """
    if not (KERAS[0] <= release(keras_version) <= KERAS[1]
            and TENSORFLOW[0] <= release(tensorflow_version) <= TENSORFLOW[1]):
        keras, tensorflow = requirements()
        raise KerasCompatError(
            f"disttrain is not tested with keras=={keras_version} and "
            f"tensorflow=={tensorflow_version}: its Keras fixes patch Keras internals that "
            f"change between releases (docs/keras_compat.md#supported-versions). Supported: {keras} (keras-nightly "
            f"{KERAS[1][0]}.{KERAS[1][1]}.dev included), {tensorflow}. "
            f"Fix: pip install '{keras}' '{tensorflow}'."
        )


def step_ranges(keras_version: str) -> bool:
    """Whether this Keras's epoch iterator yields `(begin, end, iterator)` (else
    `(step, iterator)`)."""
    return release(keras_version) >= STEP_RANGES_SINCE
