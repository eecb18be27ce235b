"""Clusters derived from launcher variables when there is no TF_CONFIG (no TensorFlow needed).

The real launchers run in tests/launch/slurm/test_slurm.py and tests/launch/mpi/test_mpi.py; these cover the shapes a
one-machine Slurm cannot produce (several nodes) and the refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from disttrain.cluster import Cluster
from disttrain.cluster.launcher_env import (
    PORT_BASE,
    PORT_SLOT_WIDTH,
    derive_from_launcher,
    derived_ports,
    expand_tasks_per_node,
)
from disttrain.errors import ClusterConfigError
from disttrain.testing import worker_env


def slurm_env(node: str, local_id: int, **extra: str) -> dict[str, str]:
    """What srun sets for a task of step 7 of job 1234 on 3 nodes, 2+2+1 tasks."""
    return {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "7", "SLURM_STEP_NUM_TASKS": "5",
            "SLURM_STEP_NODELIST": "gpu[01-02],cpu-a7", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
            "SLURMD_NODENAME": node, "SLURM_LOCALID": str(local_id), "SLURM_NTASKS": "5",
            **extra}


def test_slurm_multi_node_step_in_node_order():
    ports = derived_ports(1234, 7, 2)
    want = (f"gpu01:{ports[0]}", f"gpu01:{ports[1]}", f"gpu02:{ports[0]}",
            f"gpu02:{ports[1]}", f"cpu-a7:{ports[0]}")
    clusters = [derive_from_launcher(slurm_env(node, local))
                for node, local in [("gpu01", 0), ("gpu01", 1), ("gpu02", 0), ("gpu02", 1),
                                    ("cpu-a7", 0)]]
    assert [c.task_index for c in clusters] == [0, 1, 2, 3, 4]
    assert {c.workers for c in clusters} == {want}
    assert {c.run_id for c in clusters} == {"slurm-1234.7"}
    assert [c.is_chief for c in clusters] == [True, False, False, False, False]
    assert clusters[0].source == "Slurm step 1234.7"
    reserved = derive_from_launcher(slurm_env("gpu02", 1, SLURM_STEP_RESV_PORTS="12000-12002"))
    assert reserved.workers[:3] == ("gpu01:12000", "gpu01:12001", "gpu02:12000")
    assert reserved.task_index == 3


def test_slurm_one_task_or_batch_script_stays_single():
    one = derive_from_launcher({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0",
                                "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"})
    assert (one.num_workers, one.is_multi_worker, one.run_id) == (1, False, "slurm-9.0")
    older = slurm_env("gpu02", 0)
    del older["SLURM_STEP_NUM_TASKS"]
    assert derive_from_launcher(older).task_index == 2
    # The batch script of `sbatch -n 2` is one process: SLURM_NTASKS counts the allocation.
    batch = Cluster.from_env({"SLURM_JOB_ID": "9", "SLURM_NTASKS": "2"})
    assert (batch.num_workers, batch.run_id, batch.source) == (1, None, "TF_CONFIG")


def test_tf_config_and_run_id_given_win():
    tf_config = json.dumps({"cluster": {"worker": ["h:1", "h:2", "h:3"]},
                            "task": {"type": "worker", "index": 2}})
    given = Cluster.from_env({**slurm_env("gpu01", 0), "TF_CONFIG": tf_config,
                              "WORLD_SIZE": "4"})
    assert (given.workers, given.task_index, given.source) == (("h:1", "h:2", "h:3"), 2,
                                                              "TF_CONFIG")
    named = Cluster.from_env({**slurm_env("gpu01", 0), "DISTTRAIN_RUN_ID": "mine"})
    assert (named.run_id, named.num_workers) == ("mine", 5)


def test_derived_ports_never_collide_between_steps_or_nearby_jobs():
    for job in range(0, 5000, 13):
        steps = [set(derived_ports(job, step, PORT_SLOT_WIDTH)) for step in range(64)]
        assert len(set().union(*steps)) == 64 * PORT_SLOT_WIDTH
        ports = derived_ports(job, 0, PORT_SLOT_WIDTH)
        assert PORT_BASE <= ports[0] and ports[-1] < 32768
    seen = {tuple(derived_ports(job, 0, 1)) for job in range(10_000, 10_797)}
    assert len(seen) == 797
    with pytest.raises(ClusterConfigError, match="srun --resv-ports"):
        derived_ports(1, 0, PORT_SLOT_WIDTH + 1)


@pytest.mark.parametrize("env, names", [
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "3"}, ["more than one host", "OMPI_COMM_WORLD_LOCAL_SIZE=2"]),
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, ["PMI_SIZE=2", "MPICH"]),
    ({"PMIX_RANK": "0"}, ["PMIX_RANK='0'"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE=2", "torchrun"]),
    (slurm_env("gpu09", 0), ["SLURMD_NODENAME='gpu09'", "gpu[01-02],cpu-a7"]),
    (slurm_env("gpu01", 2), ["SLURM_LOCALID=2"]),
    ({**slurm_env("gpu01", 0), "SLURM_STEP_NUM_TASKS": "4"}, ["inconsistent"]),
    ({**slurm_env("gpu01", 0), "SLURM_STEP_RESV_PORTS": "12000"}, ["srun --resv-ports=2"]),
])
def test_several_tasks_that_cannot_be_placed_are_refused(env, names):
    with pytest.raises(ClusterConfigError) as raised:
        Cluster.from_env(env)
    for name in [*names, "Fix:"]:
        assert name in str(raised.value)


def test_one_task_of_any_launcher_stays_single():
    for env in ({"WORLD_SIZE": "1", "RANK": "0"}, {"PMI_SIZE": "1"},
                {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}):
        assert not Cluster.from_env(env).is_multi_worker


def test_tasks_per_node_lists():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    for bad in ("", "2(x0)", "x", "2(3)"):
        with pytest.raises(ClusterConfigError, match="SLURM_STEP_TASKS_PER_NODE"):
            expand_tasks_per_node(bad)


def test_strategy_refuses_before_training():
    """`disttrain.strategy()` under torchrun-style variables: ClusterConfigError, no strategy."""
    code = ("import disttrain\ntry:\n    disttrain.strategy()\nexcept disttrain.ClusterConfigError"
            " as e:\n    print('REFUSED', e)\n    raise SystemExit(2)\nprint('TRAINED')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=worker_env({"WORLD_SIZE": "2", "RANK": "1"}))
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "REFUSED this process is one of 2 tasks" in proc.stdout
