"""`python -m disttrain.check cluster` (the default) under launch.local and simulated pods, and
`python -m disttrain.check gpu` where no GPU is. (Under a real Slurm: tests/launch/slurm/test_slurm.py.)

- Two workers under launch.local: every item passes, the chief reports the cluster, run id,
  versions, an all-reduce table and the URL probe, and the probe leaves nothing behind (not
  even the directories it had to create).
- The same under a read-only view of the URL: every task exits 1 naming `url-write`.
- Two pods of a generated Indexed Job, each with its own disk at the checkpoint path (the
  mistake of a local path instead of a shared volume): the all-reduce passes, then every
  task exits 1 naming `url-read` and the worker that cannot see the chief's file.
- `gpu` with no GPU exits 4 saying so; `gpu --cpu-stand-in` runs its items on 2 logical CPUs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from disttrain.check import cluster as check, gpu
from disttrain.testing import run_launcher, worker_env
from launch import k8s
from workloads.k8s_pods import OWNER_UID
from tests.support import REPO_ROOT
from tests.support.processes import can_make_read_only_views, read_only_view
from workloads.pod_network import PodNetwork, netns_unavailable
from tests.support.pod_network import run_pods

PY = sys.executable
CHECK = ["-m", "disttrain.check", "--sizes", "4K", "1M", "--calls", "3"]


def _launch(url: str, wrap=None):
    return run_launcher(["--workers", "2", "--", PY, *CHECK, "--url", url], timeout=150,
                        cwd=REPO_ROOT, wrap=wrap)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_workers_under_launch_local_pass_and_the_probe_leaves_nothing(tmp_path):
    (tmp_path / "keep").write_text("mine")
    job = _launch(str(tmp_path / "ckpt" / "run"))
    out = job.stdout
    assert job.returncode == check.EXIT_OK and job.survivors == [], job.report()
    assert ("[w0] cluster     TF_CONFIG: 2 training task(s); this task w0 (rank 0, chief); "
            "chief 127.0.0.1:") in out
    assert "[w1] cluster     TF_CONFIG: 2 training task(s); this task w1 (rank 1, not chief)" in out
    run_id = job.stderr.split("[launch] run ", 1)[1].split(":", 1)[0]
    assert f"[w0] run id      {run_id}\n" in out
    assert "[w0] strategy    CollectiveAllReduceStrategy, 2 replica(s)" in out
    assert "[w0] versions    python 3." in out and "(every task)" in out
    assert "[w0]                  4 KiB" in out and "[w0]                  1 MiB" in out
    assert "all 2 task(s) read it back, the chief removed it" in out
    assert "[w0] OK: 7 items passed" in out and "[w1] OK: 7 items passed" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unwritable_url_fails_every_task_naming_url_write(tmp_path):
    if not can_make_read_only_views():
        pytest.skip("needs root and unshare for a read-only view")
    job = _launch(str(tmp_path / "ckpt"), wrap=lambda c: read_only_view(tmp_path, c))
    assert job.returncode == check.EXIT_FAILED and job.survivors == [], job.report()
    assert "[w0]                  1 MiB" in job.stdout, "the items before the URL passed"
    for task in ("w0", "w1"):
        assert (f"[{task}] FAILED: url-write: StorageError: check.url-write failed on w0: "
                in job.stderr), job.report()
    assert "Read-only file system" in job.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pods_with_a_disk_each_fail_url_read_naming_the_worker(tmp_path):
    """What a pod gets from a generated Indexed Job (workloads/k8s_pods.py), each in its own network
    namespace; the checkpoint path is a private tmpfs in each pod (an emptyDir, not a shared
    volume)."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (f"mount -t tmpfs none {disk} && exec python {' '.join(CHECK[:-2])} --calls 2 "
               f"--url {disk}/ckpt")
    config = k8s.JobConfig(name="check", workers=2, image="unused", peer_timeout=120,
                           env=(("TF_CPP_MIN_LOG_LEVEL", "3"),),
                           command=("unshare", "--mount", "sh", "-c", command))
    with PodNetwork(2) as network:
        outputs = run_pods(network, config, order=[0, 1], delay=0, tmp_path=tmp_path,
                            timeout=200)
        codes = [p.returncode for p in network.procs]
    assert codes == [check.EXIT_FAILED] * 2, "\n---\n".join(outputs)
    chief, worker = outputs
    assert ("cluster     TF_CONFIG: 2 training task(s); this task w0 (rank 0, chief); chief "
            "check-0.check") in chief
    assert f"run id      {OWNER_UID}" in chief
    assert "             1 MiB" in chief, "the all-reduce between the pods passed"
    for output in outputs:
        assert ("FAILED: url-read: StorageError: check.url-read failed on w1: "
                in output), output
        assert "FileNotFoundError" in output
    assert list(disk.iterdir()) == []


def test_a_bad_cluster_fails_the_first_item_before_tensorflow_starts():
    """A malformed TF_CONFIG: exit 1 naming `cluster` and the bad value; bad arguments exit 2."""
    tf_config = '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}'
    env = worker_env({"TF_CONFIG": tf_config})
    run = subprocess.run([PY, "-m", "disttrain.check"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == check.EXIT_FAILED, run.stdout + run.stderr
    assert run.stderr.startswith("FAILED: cluster: ClusterConfigError: "), run.stderr
    assert "task.index=3" in run.stderr and run.stdout == ""
    usage = subprocess.run([PY, "-m", "disttrain.check", "--calls", "0"], cwd=REPO_ROOT,
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == check.EXIT_USAGE and "--calls must be >= 1" in usage.stderr


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "disttrain.check", "gpu", *args], cwd=REPO_ROOT,
                          env=worker_env({"CUDA_VISIBLE_DEVICES": ""}), capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.timeout(150)
def test_gpu_check_without_gpus_says_so_and_exits_4():
    run = _gpu_check()
    assert run.returncode == gpu.EXIT_NO_GPUS, run.stdout + run.stderr[-3000:]
    assert "gpu: NOT RUN: TensorFlow sees 0 GPU(s)" in run.stderr
    assert "this check needs at least 2" in run.stderr
    assert run.stdout == ""


@pytest.mark.timeout(150)
def test_gpu_check_items_pass_on_two_logical_cpus():
    """The same code as on GPUs but for the devices: 2 replicas, an all-reduce table, and the
    fit over both against one device within the tolerance (measured: 1.3e-7 of movement)."""
    run = _gpu_check("--cpu-stand-in", "--sizes", "4K", "--calls", "2", "--steps", "4")
    assert run.returncode == gpu.EXIT_OK, run.stdout + run.stderr[-3000:]
    assert "replicas    MirroredStrategy over 2 device(s) (/cpu:0, /cpu:1): 2 replica(s)" \
        in run.stdout
    assert "parity      4 steps of fit, global batch 64, 2 devices against one" in run.stdout
    assert "OK: replicas, all-reduce and parity passed" in run.stdout
