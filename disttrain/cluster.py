"""The cluster this process belongs to, parsed and validated from `TF_CONFIG`.

This is the one place that knows the TF_CONFIG schema: it parses and validates
TF_CONFIG, and builds it for launchers and tests (`build_tf_config`). It imports
nothing heavy (no TensorFlow), so launchers can use it and start in milliseconds.

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
import time
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
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
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
        (a Slurm step, Open MPI's `mpirun`: see `derive_from_launcher`), or this is
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


# Clusters derived from the launcher that started this process, when there is no TF_CONFIG.

# Ports derived for a Slurm step without reserved ports: slot (job id * 64 + step id) mod 797
# of 16 ports each, from 20000 (the block ends at 32751, below Linux's ephemeral range).
PORT_BASE = 20000
PORT_SLOT_WIDTH = 16
PORT_SLOTS = 797
_PORT_STEP_STRIDE = 64
# Seconds Open MPI ranks wait for rank 0 to publish the ports it picked.
MPI_PORTS_TIMEOUT = 120.0

_shared_ports_cache: dict[str, list[int]] = {}


def derive_from_launcher(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster of a process started by a launcher that sets no TF_CONFIG.

    - **Slurm** (a step of `srun`, inside or outside `sbatch`/`salloc`): every task of the
      step is a worker, in node order (`SLURM_STEP_NODELIST`, `SLURM_STEP_TASKS_PER_NODE`,
      `SLURMD_NODENAME`, `SLURM_LOCALID`), so with Slurm's default block distribution worker
      `i` is task `i`. Ports: the ones Slurm reserved for the step (`SLURM_STEP_RESV_PORTS`,
      `srun --resv-ports` with `MpiParams=ports=...`), which no other step on the node has;
      otherwise derived from the job and step ids (`derived_ports`). A one-node step uses
      127.0.0.1; several nodes use the node names, which must resolve on every node. The run
      id is `slurm-<job id>.<step id>`: the same for the step's tasks and again after
      `scontrol requeue` (a requeued batch script numbers its steps from 0 again), so
      `BackupAndRestore` resumes.
    - **Open MPI** (`mpirun -np N`): on one host, rank `i` is worker `i` on 127.0.0.1, with
      free ports picked by rank 0 and published in `mpirun`'s own session directory (the
      job's ranks share it; `mpirun` removes it). Across hosts Open MPI tells a rank nothing
      about its peers' hosts: refused.
    - Refused, naming the fix: several tasks of another launcher (MPICH or Intel MPI's
      `PMI_SIZE`, a PMIx launcher's `PMIX_RANK`, torchrun-style `WORLD_SIZE`).

    `DISTTRAIN_RUN_ID`, when set, is the run id. TF_CONFIG is not read here: where it is set
    it wins (`Cluster.from_env`).

    Args:
        environ: the environment; default `os.environ`.

    Returns:
        The derived `Cluster` (one worker for a launcher's single task), or `None` when no
        launcher started this process.

    Raises:
        ClusterConfigError: naming the variables seen and the fix.

    Example:

    >>> c = derive_from_launcher({"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0",
    ...     "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]",
    ...     "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURMD_NODENAME": "node2",
    ...     "SLURM_LOCALID": "0", "SLURM_STEP_RESV_PORTS": "12000"})
    >>> c.workers, c.task_index, c.run_id
    (('node1:12000', 'node2:12000'), 1, 'slurm-41.0')
    """
    env = os.environ if environ is None else environ
    for derive in (_from_open_mpi, _from_slurm):
        cluster = derive(env)
        if cluster is not None:
            return cluster
    _refuse_other_launchers(env)
    return None


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands Slurm's compressed host list, as `scontrol show hostnames` does.

    Args:
        hostlist: e.g. `"node[01-03,07],gpu-a[1-2]"`; a bracket holds numbers and ranges
            (zero padding as written in the range's start) and several brackets in one
            name multiply (`"r[1-2]n[1-2]"`).

    Raises:
        ClusterConfigError: the list is malformed.

    Example:

    >>> expand_hostlist("node[01-03,7],gpu-a[1-2]")
    ['node01', 'node02', 'node03', 'node7', 'gpu-a1', 'gpu-a2']
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise _hostlist_error(hostlist, "unbalanced brackets")
        if char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth or not hostlist or "" in items:
        raise _hostlist_error(hostlist, "empty name or unbalanced brackets")
    return [name for item in items for name in _expand_host(item, hostlist)]


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """Expands Slurm's tasks-per-node list (`SLURM_STEP_TASKS_PER_NODE`).

    Example:

    >>> expand_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"([1-9][0-9]*)(?:\(x([1-9][0-9]*)\))?", item.strip())
        if not match:
            raise ClusterConfigError(
                f"SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} is not a Slurm tasks-per-node "
                "list like '2(x3),1'. Fix: run the training under srun, which sets it.")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def derived_ports(job_id: int, step_id: int, tasks_per_node: int) -> list[int]:
    """Ports for the tasks of a node of a Slurm step that has none reserved.

    A pure function of the ids, so every task of the step computes the same ports without
    talking to the others: slot `(job_id * 64 + step_id) mod 797` of 16 ports from 20000.
    Steps of one job never share a slot (up to 797 steps); two jobs' steps share one only
    when `job_id * 64 + step_id` agrees modulo 797 (for the same step id: job ids 797
    apart). Then the second step cannot listen and fails loudly (`StrategyError`); reserved
    ports (`srun --resv-ports`) never collide.

    Raises:
        ClusterConfigError: more than 16 tasks on one node.

    Example:

    >>> derived_ports(41, 0, 2)
    [23728, 23729]
    """
    if tasks_per_node > PORT_SLOT_WIDTH:
        raise ClusterConfigError(
            f"{tasks_per_node} tasks on one node need more than the {PORT_SLOT_WIDTH} ports "
            "disttrain derives for a step. Fix: let Slurm reserve the ports (srun "
            "--resv-ports, with MpiParams=ports=12000-12999 in slurm.conf), or run at most "
            f"{PORT_SLOT_WIDTH} tasks per node.")
    slot = (job_id * _PORT_STEP_STRIDE + step_id) % PORT_SLOTS
    first = PORT_BASE + slot * PORT_SLOT_WIDTH
    return list(range(first, first + tasks_per_node))


def _hostlist_error(hostlist: str, problem: str) -> ClusterConfigError:
    return ClusterConfigError(
        f"Slurm node list {hostlist!r}: {problem}. Fix: pass Slurm's own list "
        "(SLURM_STEP_NODELIST as srun sets it), e.g. 'node[01-03,07],gpu-a[1-2]'.")


def _expand_host(item: str, hostlist: str) -> list[str]:
    parts = re.split(r"\[([^\[\]]*)\]", item)
    if len(parts) > 1 and parts[-1]:
        raise _hostlist_error(hostlist, f"text after the last bracket in {item!r}")
    names = [parts[0]]
    for numbers, text in zip(parts[1::2], parts[2::2]):
        names = [f"{name}{n}{text}" for name in names
                 for n in _expand_numbers(numbers, hostlist)]
    return names


def _expand_numbers(numbers: str, hostlist: str) -> list[str]:
    out: list[str] = []
    for part in numbers.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise _hostlist_error(hostlist, f"bad range {part!r}")
        low, high = match[1], match[2] or match[1]
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def _int_env(env: Mapping[str, str], name: str, fix: str) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit():
        raise ClusterConfigError(
            f"{name}={value!r}: expected a number, as the launcher sets it. Fix: {fix}.")
    return int(value)


def _run_id(env: Mapping[str, str], derived: str | None, source: str) -> str | None:
    given = env.get(ENV_RUN_ID)
    if given:
        return validate_run_id(given)
    return validate_run_id(derived, source) if derived else None


def _from_slurm(env: Mapping[str, str]) -> Cluster | None:
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")
    if not job or step is None:
        return None  # the batch script itself or an salloc shell: one process
    fix = "run the training with srun (or set TF_CONFIG yourself)"
    source = f"Slurm step {job}.{step}"
    run_id = _run_id(env, f"slurm-{job}.{step}", source)
    # Inside a step SLURM_NTASKS is the step's count too; older Slurm lacks the STEP_ name.
    num_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env
                         else "SLURM_NTASKS", fix)
    if num_tasks == 1:
        return Cluster(run_id=run_id, source=source)
    nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST", ""))
    counts = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    seen = (f"SLURM_STEP_NUM_TASKS={num_tasks}, SLURM_STEP_NODELIST="
            f"{env.get('SLURM_STEP_NODELIST')!r}, SLURM_STEP_TASKS_PER_NODE="
            f"{env.get('SLURM_STEP_TASKS_PER_NODE')!r}")
    if len(nodes) != len(counts) or sum(counts) != num_tasks:
        raise ClusterConfigError(f"{source}: inconsistent Slurm variables ({seen}). Fix: {fix}.")
    node_name = env.get("SLURMD_NODENAME", "")
    if node_name not in nodes:
        raise ClusterConfigError(
            f"{source}: SLURMD_NODENAME={node_name!r} is not in the step's nodes ({seen}). "
            f"Fix: {fix}.")
    local_id = _int_env(env, "SLURM_LOCALID", fix)
    node = nodes.index(node_name)
    if local_id >= counts[node]:
        raise ClusterConfigError(
            f"{source}: SLURM_LOCALID={local_id} but {counts[node]} task(s) on {node_name} "
            f"({seen}). Fix: {fix}.")
    reserved = env.get("SLURM_STEP_RESV_PORTS")
    if reserved:
        ports = [int(p) for p in _expand_numbers(reserved, f"SLURM_STEP_RESV_PORTS={reserved}")]
        if len(ports) < max(counts):
            raise ClusterConfigError(
                f"{source}: SLURM_STEP_RESV_PORTS={reserved!r} has fewer ports than the "
                f"{max(counts)} tasks on one node. Fix: srun --resv-ports={max(counts)}.")
    else:
        ports = derived_ports(int(job), _int_env(env, "SLURM_STEP_ID", fix), max(counts))
    hosts = ["127.0.0.1"] if len(nodes) == 1 else nodes
    workers = tuple(f"{host}:{ports[i]}" for host, count in zip(hosts, counts)
                    for i in range(count))
    return Cluster(task_index=sum(counts[:node]) + local_id, workers=workers, run_id=run_id,
                   source=source)


def _from_open_mpi(env: Mapping[str, str]) -> Cluster | None:
    if "OMPI_COMM_WORLD_SIZE" not in env:
        return None
    fix = "start the ranks with mpirun (Open MPI), or set TF_CONFIG yourself"
    size = _int_env(env, "OMPI_COMM_WORLD_SIZE", fix)
    run_id = _run_id(env, None, "mpirun")
    if size == 1:
        return Cluster(run_id=run_id, source="mpirun")
    local_size = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE", fix)
    if local_size != size:
        raise ClusterConfigError(
            f"mpirun started {size} ranks on more than one host (OMPI_COMM_WORLD_SIZE={size}, "
            f"OMPI_COMM_WORLD_LOCAL_SIZE={local_size}), and Open MPI tells a rank nothing "
            "about its peers' hosts, so disttrain cannot build the cluster. Fix: start the "
            "tasks with Slurm's srun (disttrain derives the cluster from SLURM_*), run on one "
            "host, or give every rank a TF_CONFIG (docs/slurm.md).")
    rank = _int_env(env, "OMPI_COMM_WORLD_RANK", fix)
    ports = _shared_ports(env, rank, size)
    return Cluster(task_index=rank, workers=tuple(f"127.0.0.1:{p}" for p in ports),
                   run_id=run_id, source="mpirun")


def _shared_ports(env: Mapping[str, str], rank: int, size: int) -> list[int]:
    """Free ports picked once by rank 0 of an `mpirun` job on one host, read by every rank.

    They meet in `mpirun`'s session directory (`PMIX_SERVER_TMPDIR`): private to the job,
    shared by its ranks, removed by `mpirun` at the end, so no stale choice is ever read.
    """
    directory, job = env.get("PMIX_SERVER_TMPDIR"), env.get("PMIX_NAMESPACE")
    if not directory or not job or not os.path.isdir(directory):
        raise ClusterConfigError(
            f"mpirun's session directory is not available (PMIX_SERVER_TMPDIR={directory!r}, "
            f"PMIX_NAMESPACE={job!r}), where the ranks share their ports. Fix: use Open MPI "
            "4 or newer, or set TF_CONFIG yourself.")
    path = os.path.join(directory, f"disttrain-ports-{job}.json")
    if path in _shared_ports_cache:
        return _shared_ports_cache[path]
    if rank == 0 and not os.path.exists(path):
        with open(f"{path}.tmp", "w") as f:
            json.dump(free_ports(size), f)
        os.replace(f"{path}.tmp", path)
    deadline = time.monotonic() + MPI_PORTS_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ClusterConfigError(
                f"rank 0 of mpirun did not publish its ports in {path} within "
                f"{MPI_PORTS_TIMEOUT:.0f} s. Fix: check that rank 0 starts (its output).")
        time.sleep(0.05)
    with open(path) as f:
        ports = json.load(f)
    _shared_ports_cache[path] = ports
    return ports


# Launchers whose tasks disttrain recognises but cannot place: (size, rank, what starts them).
_OTHER_LAUNCHERS = (
    ("PMI_SIZE", "PMI_RANK",
     "an MPI launcher that does not say where its peers are (MPICH or Intel MPI's mpiexec)"),
    ("WORLD_SIZE", "RANK", "a torchrun-style launcher, which starts PyTorch workers"),
)


def _refuse_other_launchers(env: Mapping[str, str]) -> None:
    fix = ("Fix: start the tasks with Slurm's srun or Open MPI's mpirun on one host, with "
           "python -m launch.local --workers N, or give every task a TF_CONFIG")
    for size_name, rank_name, what in _OTHER_LAUNCHERS:
        size = env.get(size_name, "")
        if size.isdigit() and int(size) > 1:
            raise ClusterConfigError(
                f"this process is one of {size} tasks of {what} ({size_name}={size}, "
                f"{rank_name}={env.get(rank_name)!r}), and there is no TF_CONFIG. {fix}.")
    if "PMIX_RANK" in env:
        raise ClusterConfigError(
            f"this process is a task of a PMIx launcher (PMIX_RANK={env['PMIX_RANK']!r}) that "
            "says neither how many tasks there are nor where, and there is no TF_CONFIG. "
            f"{fix}.")
