"""Exception types raised by disttrain, and the exit codes of its processes.

Every error names the bad value and says how to fix it. They all derive from
`DisttrainError`, so `except disttrain.DisttrainError` catches any of them.

Exit codes are the form an error takes between processes (a worker, a
launcher, a pod): each has one name here, which the launchers, the Kubernetes
manifests and the workers share. Importing this module imports no TensorFlow.
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


class InputMismatchError(DisttrainError, ValueError):
    """Workers' unsharded inputs differ where TensorFlow shards them by element.

    Each worker would take every N-th batch of a different order, so some samples
    would be counted twice and others not at all. Raised on every worker before
    the first step of `fit`, `evaluate` or `predict`.
    """


class PreflightError(DisttrainError, ValueError):
    """A configuration that is certainly wrong for multi-worker training, found before
    the first step (e.g. a global batch smaller than the number of replicas)."""


class PreflightWarning(UserWarning):
    """Configuration mistakes that silently cost accuracy or time, reported once before
    the first step of `fit`, `evaluate` or `predict`."""


class MissingDependencyError(DisttrainError, ImportError):
    """A package disttrain needs for what was asked (TensorFlow, Keras 3) is not installed."""


EXIT_CONFIG_ERROR = 2
"""A configuration error found before training (bad arguments, environment or TF_CONFIG):
retrying cannot help, so the Kubernetes manifests fail the job at once."""
EXIT_PEERS_UNREACHABLE = 3
"""`launch.entrypoint` did not meet every peer within its `--peer-timeout`."""
STALLED_EXIT_CODE = 70
"""Exit code of a worker that `disttrain.coordination.liveness` found stuck while its peers waited."""
PREEMPTED_EXIT_CODE = 75
"""A worker stopped for a preemption after saving a backup (`EX_TEMPFAIL`): restart it."""
EXIT_TIMEOUT = 124
"""`launch.local` stopped a job that ran past `--timeout` or `--startup-timeout`."""
EXIT_CANNOT_EXECUTE = 126
"""The command exists but cannot be executed (as in POSIX shells)."""
EXIT_COMMAND_NOT_FOUND = 127
"""The command was not found (as in POSIX shells)."""


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


class FirewallUnavailable(DisttrainError, RuntimeError):
    """`launch.local` could not close the job's ports to other hosts; the message says why."""


class ChiefOnlyError(DisttrainError, RuntimeError):
    """Code that runs on the chief only (`disttrain.callbacks.on_chief`) failed: it called
    something every worker must call together (a strategy collective, `model.evaluate`, a
    disttrain agreement), which the other workers would never join, or it raised (then
    the other workers raise this with the chief's message)."""


class StorageConfigError(CallbackConfigError):
    """A storage setting cannot work: a path template (`{run_id}` and the fields a
    callback fills), a retention rule, a `CheckpointManager` option.

    Raised by `disttrain.storage`; a `CallbackConfigError` (and so a `ValueError`), so
    code that catches the callbacks' configuration errors catches it too."""


class LaterBatchMismatchError(InputMismatchError):
    """A generator or `PyDataset` yielded a different batch on each worker after its first
    batch agreed (or ran out on one worker only).

    Found by comparing every batch's hash between the workers at the end of each epoch
    and of each validation pass of `fit` (`disttrain.keras_compat.later_batches`), so
    raised on every worker after that epoch's (validation's) steps and before the next
    epoch; the message names the input, the epoch and the first differing step."""
