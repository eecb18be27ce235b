"""Exception types raised by disttrain.

Every error names the bad value and says how to fix it. They all derive from
`DisttrainError`, so `except disttrain.DisttrainError` catches any of them.
"""

from __future__ import annotations


class DisttrainError(Exception):
    """Base class of every error disttrain raises on purpose."""


class ClusterConfigError(DisttrainError, ValueError):
    """TF_CONFIG (or a cluster description built for it) is malformed."""


class StorageError(DisttrainError, OSError):
    """A read, write, commit or delete through fsspec failed."""


class CoordinationError(DisttrainError, RuntimeError):
    """Workers could not agree: a peer is gone, timed out, or reported an error."""


class CallbackConfigError(DisttrainError, ValueError):
    """A callback was given arguments it cannot work with."""


class KerasCompatError(DisttrainError, RuntimeError):
    """The installed Keras/TensorFlow cannot be patched for multi-worker training."""


class StrategyError(DisttrainError, RuntimeError):
    """The distribution strategy cannot be created as asked."""


PREEMPTED_EXIT_CODE = 75
STALLED_EXIT_CODE = 70
"""Exit code of a worker that `disttrain.liveness` found stuck while its peers waited."""


class Preempted(SystemExit):
    """Training stopped for a preemption signal after saving a backup; exits the process.

    A `SystemExit` (not an `Exception`), so a script's `except Exception` does not
    swallow it: the process exits with `PREEMPTED_EXIT_CODE` (75, `EX_TEMPFAIL`:
    "try again"), which `launch.local --max-restarts` and the Kubernetes manifests
    of `launch.k8s` treat as "restart and resume from the backup".
    """

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message
