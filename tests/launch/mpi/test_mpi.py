"""disttrain under Open MPI's `mpirun` (Debian's openmpi-bin, installed with apt-get when missing).

Before disttrain derived the cluster from OMPI_COMM_WORLD_*, `mpirun -np 2 python train.py`
ran two separate trainings (1 replica each, different weights, exit 0). Now the ranks on one
host train as one cluster on ports rank 0 picked and published in mpirun's session directory;
ranks on several hosts are refused (tests/cluster/test_launcher_clusters.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import pytest

from tests.support import REPO_ROOT



@pytest.fixture(scope="module")
def mpirun() -> str:
    """The path of Open MPI's mpirun, installed with apt-get if missing."""
    if shutil.which("mpirun") is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("no mpirun: openmpi-bin is not installed and apt-get (as root) is not "
                        "available to install it")
        start = time.monotonic()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openmpi-bin"]
        if subprocess.run(command, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(command, env=env, capture_output=True, check=True)
        print(f"openmpi-bin installed in {time.monotonic() - start:.1f} s")
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    assert "Open MPI" in version, version
    return shutil.which("mpirun")


@pytest.mark.slow
def test_mpirun_ranks_train_one_cluster(mpirun, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
    env.pop("TF_CONFIG", None)
    proc = subprocess.run(
        [mpirun, "--allow-run-as-root", "--bind-to", "none", "-np", "2", sys.executable,
         "tests/launch/workers/engine_train.py", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("task-*.json"))]
    assert [t["replicas"] for t in tasks] == [2, 2], tasks
    assert sorted(t["rank"] for t in tasks) == [0, 1]
    assert tasks[0]["weights"] == tasks[1]["weights"]
    (run_id,) = {t["run_id"] for t in tasks}
    workers = tasks[0]["cluster"]["cluster"]["worker"]
    assert len(workers) == 2 and all(w.startswith("127.0.0.1:") for w in workers)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file() and p.suffix != ".json")
    assert written == [f"{run_id}/model.keras"], written
