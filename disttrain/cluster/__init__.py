"""The cluster this process belongs to, parsed and validated from `TF_CONFIG`.

This is the one place that knows the TF_CONFIG schema: it parses and validates
TF_CONFIG, and builds it for launchers and tests (`build_tf_config`). It imports
nothing heavy (no TensorFlow), so launchers can use it and start in milliseconds.
Without TF_CONFIG, `Cluster.from_env` asks `launcher_env`, which derives the cluster
from the environment of a launcher that sets none (a Slurm step, Open MPI's `mpirun`).

TF_CONFIG looks like:

```json
{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
 "task": {"type": "worker", "index": 0}}
```

Rules (those of `tf.distribute.MultiWorkerMirroredStrategy`):
- training tasks are the optional single `chief` plus the `worker`s;
- worker 0 is the chief unless a `chief` task exists;
- indices are integers, addresses are unique `host:port` strings.

The shapes platforms write are accepted as they are (sources in README,
"Where it runs"):
- Vertex AI: a separate `chief` (worker pool 0), top-level `environment` and
  `job` (the job spec), `task.trial` and `task.cloud`;
- Kubeflow TFJob: `chief`, or `master` (its older name, read as `chief`), and
  the `evaluator` listed inside `cluster` (one at most);
- SageMaker (`environment: "cloud"`) and Ray Train (a plain worker list).
TensorFlow is given the training view only (`Cluster.to_tf_config`): `master`
as `chief`, no evaluator. A parameter-server job (`ps`) is not a
MultiWorkerMirroredStrategy job and is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from disttrain.errors import ClusterConfigError

ENV_TF_CONFIG = "TF_CONFIG"
ENV_RUN_ID = "DISTTRAIN_RUN_ID"
# Set by launchers: the restart attempt (0, 1, ...) of the whole worker group.
ENV_ATTEMPT = "DISTTRAIN_ATTEMPT"
# Set by launchers: a local path where the chief writes the job's result (a JSON object,
# e.g. the best checkpoint manifest) at train end, for the launcher's summary.
ENV_RESULT_FILE = "DISTTRAIN_RESULT_FILE"

TRAINING_TASK_TYPES = ("chief", "worker")
TASK_TYPES = ("chief", "worker", "evaluator")
# Older names platforms still write (Kubeflow TFJob's Master, old Vertex AI jobs).
TASK_TYPE_ALIASES = {"master": "chief"}
# Top-level keys besides cluster and task: TensorFlow's own, and Vertex AI's job spec.
EXTRA_TOP_LEVEL_KEYS = ("environment", "rpc_layer", "job")

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)$")


def _fail(field: str, value: Any, problem: str, fix: str) -> ClusterConfigError:
    return ClusterConfigError(f"TF_CONFIG {field}={value!r}: {problem}. Fix: {fix}.")


def is_decimal(text: str) -> bool:
    """Whether `text` is a non-negative integer in ASCII digits, which `int()` reads
    (`"²".isdigit()` is true, but `int("²")` fails).

    >>> is_decimal("2222"), is_decimal("²"), is_decimal("-1"), is_decimal(" 1")
    (True, False, False, False)
    """
    return text.isascii() and text.isdigit()


def parse_address(address: Any, field: str = "address") -> tuple[str, int]:
    """Splits a `host:port` string into `(host, port)`, validating both.

    IPv6 hosts are written in brackets: `[::1]:2222`.

    Raises:
        ClusterConfigError: when `address` is not a `host:port` string with a
            port in 1..65535.
    """
    fix = "write each address as 'host:port', e.g. '127.0.0.1:2222' or '[::1]:2222'"
    if not isinstance(address, str):
        raise _fail(field, address, "an address must be a string", fix)
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not _HOST_RE.match(host):
        raise _fail(field, address, "not a valid 'host:port' address", fix)
    if not is_decimal(port_text) or not 1 <= int(port_text) <= 65535:
        raise _fail(field, address, "the port must be an integer in 1..65535", fix)
    return host, int(port_text)


def validate_run_id(run_id: str, source: str = ENV_RUN_ID) -> str:
    """Checks that a run id is safe to use inside paths and object names."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ClusterConfigError(
            f"{source}={run_id!r} is not a valid run id: it must be 1-64 characters "
            "from letters, digits, '.', '_' and '-', starting with a letter or digit. "
            f"Fix: set {source} to something like 'mnist-20260101-1'."
        )
    return run_id


def new_run_id() -> str:
    """A fresh run id, `<yyyymmdd-hhmmss>-<6 hex>` in UTC, e.g. `20260101-120000-3fa2c1`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# How a task reports that its TF_CONFIG port was taken between a launcher's check and
# its own bind. TensorFlow 2.21 logs (at any TF_CPP_MIN_LOG_LEVEL below 3)
#   add_port.cc: Failed to add port to server: No address added out of total 1
#   resolved for '0.0.0.0:PORT'
# and always raises "UnknownError: Could not start gRPC server". Older gRPC
# builds log the OS error ("Address already in use", errno 98); grpcio raises
# "Failed to bind to address".
PORT_CLASH = re.compile(
    r"address already in use|EADDRINUSE|Failed to add port to server|"
    r"No address added out of total|Could not start gRPC server|Failed to bind to address",
    re.IGNORECASE,
)


def build_tf_config(
    workers: Sequence[str],
    task_type: str,
    task_index: int,
    chief: str | None = None,
) -> dict[str, Any]:
    """Returns the TF_CONFIG dict for one task, validated as `Cluster` parses it.

    Args:
        workers: `host:port` of each `worker` task.
        task_type: `"chief"`, `"worker"` or `"evaluator"`.
        task_index: index within `task_type`.
        chief: `host:port` of a separate chief task, if any.

    Raises:
        ClusterConfigError: the result is not a valid TF_CONFIG (a bad address, an
            index out of range...), naming the field and the fix.

    Example:

    >>> build_tf_config(["127.0.0.1:2001", "127.0.0.1:2002"], "worker", 1)
    {'cluster': {'worker': ['127.0.0.1:2001', '127.0.0.1:2002']}, 'task': {'type': 'worker', 'index': 1}}
    """
    cluster: dict[str, list[str]] = {}
    if chief is not None:
        cluster["chief"] = [chief]
    if workers:
        cluster["worker"] = list(workers)
    config = {"cluster": cluster, "task": {"type": task_type, "index": task_index}}
    Cluster.from_tf_config(config)
    return config


@dataclasses.dataclass(frozen=True)
class Cluster:
    """An immutable view of TF_CONFIG for this process.

    Attributes:
        task_type: `"chief"`, `"worker"` or `"evaluator"`.
        task_index: index of this task within its type.
        chief: address of the separate chief task, or `None` (then worker 0 is chief).
        workers: addresses of the `worker` tasks.
        run_id: the run id shared by all tasks (`DISTTRAIN_RUN_ID`), or `None`.
        source: where the cluster came from, for messages: `"TF_CONFIG"`, or the
            launcher it was derived from (e.g. `"Slurm step 41.0"`, `"mpirun"`).

    Example:

    >>> c = Cluster.from_tf_config(
    ...     {"cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]},
    ...      "task": {"type": "worker", "index": 1}})
    >>> c.num_workers, c.is_chief, c.worker_rank
    (2, False, 1)
    """

    task_type: str = "worker"
    task_index: int = 0
    chief: str | None = None
    workers: tuple[str, ...] = ()
    run_id: str | None = None
    source: str = ENV_TF_CONFIG

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Cluster":
        """Reads `TF_CONFIG` and `DISTTRAIN_RUN_ID` from the environment.

        A `TF_CONFIG` is used as given. Without one, the cluster comes from the
        launcher that started this process as one of several tasks
        (a Slurm step, Open MPI's `mpirun`: see `launcher_env.derive_from_launcher`), or this is
        refused when the launcher does not say enough (another MPI, a
        torchrun-style launcher): never N separate trainings. A process that is
        one task alone is a single-worker cluster.

        Raises:
            ClusterConfigError: TF_CONFIG is malformed, or this process is one of
                several tasks whose cluster cannot be derived.
        """
        env = os.environ if environ is None else environ
        run_id = env.get(ENV_RUN_ID) or None
        raw = env.get(ENV_TF_CONFIG, "")
        if raw.strip():
            return cls.from_tf_config(raw, run_id=run_id)
        from disttrain.cluster.launcher_env import derive_from_launcher

        return derive_from_launcher(env) or cls(
            run_id=validate_run_id(run_id) if run_id else None)

    @classmethod
    def from_tf_config(
        cls, tf_config: str | Mapping[str, Any], run_id: str | None = None
    ) -> "Cluster":
        """Parses and validates a TF_CONFIG given as a JSON string or a mapping.

        Raises:
            ClusterConfigError: naming the bad field, its value and the fix.
        """
        if isinstance(tf_config, str):
            fix = ('set TF_CONFIG to a JSON object such as {"cluster": {"worker": '
                   '["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 0}}')
            try:
                config = json.loads(tf_config)
            except json.JSONDecodeError as e:
                raise _fail("", tf_config[:200], f"not valid JSON ({e.msg} at position {e.pos})",
                            fix) from None
            except RecursionError:
                raise _fail("", tf_config[:200], "nested too deeply to parse", fix) from None
        else:
            config = tf_config
        if not isinstance(config, Mapping):
            raise _fail("", config, "must be a JSON object", 'use {"cluster": ..., "task": ...}')
        unknown = sorted(set(config) - {"cluster", "task", *EXTRA_TOP_LEVEL_KEYS})
        if unknown:
            raise _fail(
                "keys", unknown, "unknown top-level keys",
                "keep only 'cluster' and 'task' (and optionally "
                f"{', '.join(repr(k) for k in EXTRA_TOP_LEVEL_KEYS)})",
            )
        cluster = _parse_cluster(config.get("cluster"))
        task_type, task_index = _parse_task(config.get("task"), cluster)
        chief = cluster.get("chief", [None])[0]
        return cls(
            task_type=task_type,
            task_index=task_index,
            chief=chief,
            workers=tuple(cluster.get("worker", ())),
            run_id=validate_run_id(run_id) if run_id else None,
        )

    def required_run_id(self, who: str | None = None) -> str:
        """The run id the launcher gave (`DISTTRAIN_RUN_ID`), which this task cannot make up.

        Training tasks agree on a run id among themselves when none is given;
        a task outside the training group (the evaluator) or a separate
        process reading a run's outputs has nobody to agree with, so it must
        be told the training tasks' id.

        Args:
            who: how the message names the caller; default this task's label.

        Raises:
            ClusterConfigError: `DISTTRAIN_RUN_ID` is not set.

        Example:

        >>> Cluster(task_type="evaluator", run_id="run-7").required_run_id()
        'run-7'
        """
        if self.run_id:
            return self.run_id
        raise ClusterConfigError(
            f"{who or f'the {self.label} task'} needs the training run's id, and "
            f"{ENV_RUN_ID} is not set: it is outside the training group, so no chief can tell "
            f"it the id the training tasks use. Fix: set {ENV_RUN_ID} to the same value for "
            "every task (python -m launch.local and the manifests of python -m launch.k8s do)."
        )

    @property
    def training_addresses(self) -> tuple[str, ...]:
        """Addresses of all training tasks, chief first (the MWMS worker order)."""
        return ((self.chief,) if self.chief else ()) + self.workers

    @property
    def num_workers(self) -> int:
        """Number of training tasks (a separate chief counts as one); at least 1."""
        return max(1, len(self.training_addresses))

    @property
    def is_multi_worker(self) -> bool:
        """True when more than one training task takes part."""
        return len(self.training_addresses) > 1

    @property
    def is_evaluator(self) -> bool:
        return self.task_type == "evaluator"

    @property
    def is_chief(self) -> bool:
        """True for the one task that writes checkpoints and logs."""
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and self.chief is None

    @property
    def worker_rank(self) -> int:
        """Global rank among training tasks: the chief is 0. Evaluators get -1."""
        if self.is_evaluator:
            return -1
        if self.task_type == "chief":
            return 0
        return self.task_index + (1 if self.chief else 0)

    @property
    def label(self) -> str:
        """Short name for log prefixes and file names: `chief`, `w3`, `evaluator`."""
        if self.task_type == "worker":
            return f"w{self.task_index}"
        return self.task_type

    def task_at_rank(self, rank: int) -> tuple[str, int]:
        """`(task_type, task_index)` of the training task with global rank `rank` (chief = 0)."""
        if self.chief:
            return ("chief", 0) if rank == 0 else ("worker", rank - 1)
        return "worker", rank

    def label_of_rank(self, rank: int) -> str:
        """The `label` of the training task with global rank `rank`."""
        task_type, index = self.task_at_rank(rank)
        return f"w{index}" if task_type == "worker" else task_type

    def to_tf_config(self) -> dict[str, Any]:
        """The TF_CONFIG dict describing this task (inverse of `from_tf_config`)."""
        cluster: dict[str, list[str]] = {}
        if self.chief:
            cluster["chief"] = [self.chief]
        if self.workers:
            cluster["worker"] = list(self.workers)
        return {"cluster": cluster, "task": {"type": self.task_type, "index": self.task_index}}


def free_ports(count: int) -> list[int]:
    """`count` ports free on this machine now (portpicker), for a local cluster's tasks.

    The one place disttrain picks ports: `launch.local`, `disttrain.testing` and the
    single-host `mpirun` cluster call it. A port can still be taken before TensorFlow
    binds it (pick-then-release); the launchers relaunch on "address already in use".

    Example:

    ```python
    ports = free_ports(2)     # e.g. [41231, 38877]
    ```
    """
    import portpicker

    return [portpicker.pick_unused_port() for _ in range(count)]


def _parse_cluster(cluster: Any) -> dict[str, list[str]]:
    if cluster is None:
        raise _fail(
            "cluster", cluster, "missing",
            'add "cluster": {"worker": ["host:port", ...]} listing every training task',
        )
    if not isinstance(cluster, Mapping):
        raise _fail("cluster", cluster, "must be an object", 'use {"worker": ["host:port", ...]}')
    for key in cluster:
        if key == "ps":
            raise _fail(
                "cluster.ps", cluster[key],
                "a parameter-server job (ParameterServerStrategy) is not a "
                "MultiWorkerMirroredStrategy job, which disttrain runs",
                "configure the platform's job without parameter servers (e.g. no 'ps' replica "
                "or worker pool 2) and list all training tasks under 'worker'",
            )
        if key not in TASK_TYPES and key not in TASK_TYPE_ALIASES:
            raise _fail(
                f"cluster.{key}", cluster[key], "unknown task type",
                f"use only {', '.join(repr(t) for t in TASK_TYPES)} as cluster keys",
            )
    if "chief" in cluster and "master" in cluster:
        raise _fail("cluster.master", cluster["master"],
                    "'master' is another name for 'chief', and both are given",
                    "keep one of them")
    parsed: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name in (*TASK_TYPE_ALIASES, *TASK_TYPES):
        if name not in cluster:
            continue
        key = TASK_TYPE_ALIASES.get(name, name)
        addresses = cluster[name]
        field = f"cluster.{name}"
        if not isinstance(addresses, list | tuple):
            raise _fail(field, addresses, "must be a list of 'host:port' strings",
                        f'write "{key}": ["host:port", ...]')
        if not addresses:
            raise _fail(field, addresses, "is empty",
                        f"list at least one address, or remove '{key}'")
        if key == "chief" and len(addresses) != 1:
            raise _fail(field, addresses, "there can be exactly one chief",
                        "list one chief address and put the others under 'worker'")
        if key == "evaluator" and len(addresses) != 1:
            raise _fail(field, addresses, "there can be at most one evaluator",
                        "run one evaluator task (e.g. one Evaluator replica)")
        for i, address in enumerate(addresses):
            host, port = parse_address(address, f"{field}[{i}]")
            canonical = f"{host.lower()}:{port}"
            if canonical in seen:
                raise _fail(f"{field}[{i}]", address,
                            f"duplicate address (also {seen[canonical]})",
                            "give every task its own host:port")
            seen[canonical] = f"{field}[{i}]"
        parsed[key] = list(addresses)
    if not set(parsed) & set(TRAINING_TASK_TYPES):
        raise _fail("cluster", dict(cluster), "lists no training task",
                    'add "worker": ["host:port", ...]')
    return parsed


def _parse_task(task: Any, cluster: dict[str, list[str]]) -> tuple[str, int]:
    example = 'e.g. "task": {"type": "worker", "index": 0}'
    if task is None:
        raise _fail("task", task, "missing", f"add the task this process runs, {example}")
    if not isinstance(task, Mapping):
        raise _fail("task", task, "must be an object", example)
    if "type" not in task:
        raise _fail("task.type", None, "missing", example)
    if "index" not in task:
        raise _fail("task.index", None, "missing", example)
    written, index = task["type"], task["index"]
    task_type = TASK_TYPE_ALIASES.get(written, written)
    if task_type not in TASK_TYPES:
        raise _fail("task.type", written, "unknown task type",
                    f"use one of {', '.join(repr(t) for t in TASK_TYPES)}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise _fail("task.index", index, "must be an integer (not a string or float)",
                    'write "index": 0 without quotes')
    if task_type == "evaluator":
        if index != 0:
            raise _fail("task.index", index, "there is one evaluator, with index 0",
                        'use {"type": "evaluator", "index": 0}')
        return task_type, index
    if task_type not in cluster:
        raise _fail("task.type", written, f"cluster has no '{written}' entry",
                    f"add '{written}' to cluster or fix task.type")
    size = len(cluster[task_type])
    if not 0 <= index < size:
        raise _fail("task.index", index,
                    f"out of range: cluster.{task_type} has {size} entr{'y' if size == 1 else 'ies'}",
                    f"use an index in 0..{size - 1}")
    return task_type, index
