"""The cluster of a process started by a launcher that sets no TF_CONFIG: Slurm, Open MPI.

`Cluster.from_env` comes here when `TF_CONFIG` is unset: a Slurm step's tasks and
the ranks of a one-host `mpirun` become the workers of one cluster
(`derive_from_launcher`); several tasks of a launcher that does not say where its
peers are (another MPI, a torchrun-style launcher) are refused, naming the fix. The
variables read are listed in docs/configuration.md; docs/slurm.md describes the
Slurm side. The TF_CONFIG schema itself is `disttrain.cluster`'s.

Example:

>>> expand_hostlist("node[1-2]")
['node1', 'node2']
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping

from disttrain.cluster import ENV_RUN_ID, Cluster, free_ports, is_decimal, validate_run_id
from disttrain.errors import ClusterConfigError

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
    if not is_decimal(value.strip()):
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
        if not all(1 <= port <= 65535 for port in ports):
            raise ClusterConfigError(
                f"{source}: SLURM_STEP_RESV_PORTS={reserved!r} names a port outside 1..65535. "
                "Fix: set MpiParams=ports=<low>-<high> in slurm.conf to a valid range.")
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
    if rank >= size:
        raise ClusterConfigError(
            f"mpirun: OMPI_COMM_WORLD_RANK={rank} is not below OMPI_COMM_WORLD_SIZE={size}. "
            f"Fix: {fix}.")
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
        if is_decimal(size.strip()) and int(size) > 1:
            raise ClusterConfigError(
                f"this process is one of {size} tasks of {what} ({size_name}={size}, "
                f"{rank_name}={env.get(rank_name)!r}), and there is no TF_CONFIG. {fix}.")
    if "PMIX_RANK" in env:
        raise ClusterConfigError(
            f"this process is a task of a PMIx launcher (PMIX_RANK={env['PMIX_RANK']!r}) that "
            "says neither how many tasks there are nor where, and there is no TF_CONFIG. "
            f"{fix}.")
