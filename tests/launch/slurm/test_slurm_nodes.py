"""disttrain under a real two-node Slurm: each node a network namespace with its own address.

tests/launch/slurm/test_slurm.py runs Slurm's steps on one node (this machine, 127.0.0.1). Here the two
slurmds run in two network namespaces (`node1` at 198.18.0.2, `node2` at 198.18.0.3, linked by
a bridge: tests/support/pod_network.py's `PodNetwork`), slurmctld and the Slurm commands (a login
node) in a third. Each namespace resolves the node names through its own hosts file
(`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts for its processes
only), as a site's DNS would: this machine's /etc/hosts is not touched. A task on node2 reaches
node1 only by that name and address; 127.0.0.1 is each node's own. Tasks on different nodes
listen on equal ports (ports derived from the job and step ids are the same on every node),
which two processes on one host could not.

Needs root, `ip` (network namespaces) and Slurm (installed with apt-get as in
tests/support/slurm.py); skipped, saying which is missing, without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from disttrain.cluster.launcher_env import derived_ports
from tests.support import slurm as local_slurm
from workloads.pod_network import SUBNET, PodNetwork, netns_unavailable
from tests.launch.slurm.test_slurm import PY, _submit, _tasks, _wait_job

NODES = ("node1", "node2")


def _netns_prefix(ns: str) -> tuple[str, ...]:
    """Runs a command in network namespace `ns` (and its hosts file). `ip netns exec` mounts a
    fresh /sys without the cgroup hierarchies, and slurmd 22.05 refuses to start without them
    (even with proctrack/linuxproc), so the command mounts the host's kind of cgroup first, in
    its own mount namespace (nothing outside it changes)."""
    if os.path.isdir("/sys/fs/cgroup/systemd"):  # cgroup v1, as on this machine
        mount = ("mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && "
                 "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd")
    else:
        mount = "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    return ("ip", "netns", "exec", ns, "sh", "-c", f'{mount} && exec "$@"', "sh")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[str, Path, str]:
    """One job on both nodes (3 CPUs each), two steps at once:

    - `srun -N 2 -n 2 --resv-ports=0`: one task per node, on ports derived from the ids (the
      same port on both nodes), into `one/`;
    - `srun -N 2 -n 4 --ntasks-per-node=2`: two tasks per node, on the ports Slurm reserved, into
      `two/`.

    Each task runs tests/launch/workers/engine_train.py. Returns (job id, directory, state).
    """
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        local_slurm.install()
    except local_slurm.SlurmUnavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    directory = tmp_path_factory.mktemp("nodes")
    train = f"{PY} tests/launch/workers/engine_train.py"
    for name in ("one", "two"):
        (directory / name).mkdir()
    (directory / "job.sh").write_text(
        "#!/bin/sh\n"
        f"srun -N 2 -n 2 --exact --resv-ports=0 -o {directory}/one/%t.out {train} "
        f"{directory}/one &\n"
        f"srun -N 2 -n 4 --ntasks-per-node=2 --exact -o {directory}/two/%t.out {train} "
        f"{directory}/two &\n"
        "wait\n")
    with PodNetwork(1 + len(NODES)) as network:
        for i, name in enumerate(NODES, start=1):
            network.publish(i, [name])
        nodes = [local_slurm.SlurmNode(name, f"{SUBNET}.{i + 1}", _netns_prefix(network.pods[i]))
                 for i, name in enumerate(NODES, start=1)]
        controller = (f"{SUBNET}.1", _netns_prefix(network.pods[0]))
        with local_slurm.LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes,
                                    controller) as slurm:
            job_id = _submit(slurm, directory / "job.sh", "-N", "2", "--ntasks-per-node=3")
            return job_id, directory, _wait_job(slurm, job_id, 300)


def _check_one_cluster(directory: Path, per_node: int) -> list[dict]:
    """The step's tasks trained one cluster: every task saw all of them as replicas, worker `i`
    ran on node `i // per_node`, the weights agree, and only the chief wrote (its model)."""
    tasks = sorted(_tasks(directory), key=lambda t: t["rank"])
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in directory.glob("*.out"))
    count = per_node * len(NODES)
    assert len(tasks) == count, logs
    assert [t["replicas"] for t in tasks] == [count] * count, tasks
    assert [t["rank"] for t in tasks] == list(range(count))
    assert [t["node"] for t in tasks] == [n for n in NODES for _ in range(per_node)]
    assert [t["chief"] for t in tasks] == [True] + [False] * (count - 1)
    assert all(t["weights"] == tasks[0]["weights"] for t in tasks)
    (run_id,) = {t["run_id"] for t in tasks}
    written = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                     if p.is_file() and p.suffix not in (".out", ".json"))
    assert written == [f"{run_id}/model.keras"], written
    (workers,) = {tuple(t["cluster"]["cluster"]["worker"]) for t in tasks}
    assert [w.rsplit(":", 1)[0] for w in workers] == [t["node"] for t in tasks], workers
    return tasks


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_one_task_per_node_trains_one_cluster_on_equal_ports(job):
    """`srun -N 2 -n 2`: one 2-replica cluster across the nodes, reached by node name; both
    tasks listen on the same derived port, each on its own node."""
    job_id, directory, state = job
    tasks = _check_one_cluster(directory / "one", per_node=1)
    step = int(tasks[0]["run_id"].rsplit(".", 1)[1])
    (port,) = derived_ports(int(job_id), step, 1)
    assert tasks[0]["cluster"]["cluster"]["worker"] == [f"{n}:{port}" for n in NODES]
    assert state == "COMPLETED"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_tasks_per_node_train_one_cluster_on_reserved_ports(job):
    """`srun -N 2 -n 4 --ntasks-per-node=2`: one 4-replica cluster, tasks in node order; each
    node's two tasks on the first two ports Slurm reserved for the step (the same on both
    nodes)."""
    _, directory, state = job
    tasks = _check_one_cluster(directory / "two", per_node=2)
    ports = [int(w.rsplit(":", 1)[1]) for w in tasks[0]["cluster"]["cluster"]["worker"]]
    low, high = local_slurm.RESERVED_PORTS
    assert ports[:2] == ports[2:] and ports[0] + 1 == ports[1], ports
    assert low <= ports[0] < ports[1] <= high, ports
    assert state == "COMPLETED"
