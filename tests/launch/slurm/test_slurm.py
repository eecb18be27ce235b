"""disttrain under a real Slurm (Debian's slurm-wlm + munge, started by the test: tests/support/slurm.py).

- `srun` steps train as one cluster each: before disttrain derived the cluster from SLURM_*,
  `srun -n 2 python train.py` ran two separate trainings (1 replica each, two run
  directories, exit 0). Two steps of one job run at once, one on the ports Slurm reserved for
  it, one on ports derived from the job and step ids.
- A preempted job, requeued, resumes from its backup (the run id is stable across a requeue).
- The node-list parser agrees with `scontrol show hostnames` on generated lists.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest

from disttrain.cluster.launcher_env import derived_ports, expand_hostlist
from disttrain.errors import ClusterConfigError
from tests.support import REPO_ROOT
from tests.support import slurm as local_slurm

PY = sys.executable
ENV = {"PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTEROP_THREADS": "1",
       "TF_NUM_INTRAOP_THREADS": "1"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One private Slurm (munged, slurmctld, slurmd) for the module's tests."""
    try:
        seconds = local_slurm.install()
    except local_slurm.SlurmUnavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    print(f"slurm-wlm and munge installed in {seconds:.1f} s")
    with local_slurm.LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _tasks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("task-*.json"))]


def _wait_job(slurm, job: str, timeout: float) -> str:
    """Waits until the job ended; returns its state (COMPLETED, FAILED, ...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = slurm.run(["scontrol", "show", "job", job]).stdout
        state = shown.split("JobState=", 1)[1].split()[0] if "JobState=" in shown else "?"
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    slurm.run(["scancel", job])
    raise AssertionError(f"job {job} still {state} after {timeout} s\n{slurm.logs()}")


def _submit(slurm, script: Path, *options: str) -> str:
    submitted = slurm.run(["sbatch", "--parsable", "-o", str(script.parent / "job.out"),
                           *options, str(script)], env=ENV, cwd=REPO_ROOT)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory) -> dict[str, tuple[str, Path, str]]:
    """The two training jobs of this module, submitted at once (they share the 2 CPUs' wait
    for TensorFlow to start): `{"steps": (job id, directory, final state), "requeue": ...}`.

    - steps: two 2-task steps at once, the first on the ports Slurm reserved for it, the
      second (`--resv-ports=0`) on ports derived from the job and step ids; each task runs
      tests/launch/workers/engine_train.py into `srun0/` or `srun1/`.
    - check: `python -m disttrain.check` (the cluster check) as a 2-task step, its URL probe
      in `ckpt/`.
    - requeue: tests/launch/workers/resume_train.py with a backup every batch; in the first
      run task 1 gets SIGTERM mid-epoch (every task saves a backup and exits 75) and the
      batch script requeues the job; the second run resumes.
    """
    steps = tmp_path_factory.mktemp("steps")
    for i in (0, 1):
        (steps / f"srun{i}").mkdir()
    train = f"{PY} tests/launch/workers/engine_train.py"
    (steps / "job.sh").write_text(
        "#!/bin/sh\n"
        f"srun -n 2 --exact -o {steps}/srun0/%t.out {train} {steps}/srun0 &\n"
        f"srun -n 2 --exact --resv-ports=0 -o {steps}/srun1/%t.out {train} {steps}/srun1 &\n"
        "wait\n")
    requeue = tmp_path_factory.mktemp("requeue")
    (requeue / "job.sh").write_text(
        "#!/bin/sh\n"
        "export DISTTRAIN_ATTEMPT=${SLURM_RESTART_COUNT:-0}\n"
        f"srun -o {requeue}/%t-$DISTTRAIN_ATTEMPT.out {PY} tests/launch/workers/resume_train.py"
        f" --backup-dir {requeue}/{{run_id}}/backup --out {requeue}/weights.json"
        " --sigterm 0:1:1:3\n"
        "code=$?\n"
        "echo \"attempt $DISTTRAIN_ATTEMPT: srun exited $code\"\n"
        "if [ $code -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; sleep 60; fi\n"
        "exit $code\n")
    check = tmp_path_factory.mktemp("check")
    (check / "job.sh").write_text(
        "#!/bin/sh\n"
        f"srun -o {check}/%t.out {PY} -m disttrain.check --sizes 4K 1M --calls 3"
        f" --url {check}/ckpt\n")
    ids = {"steps": (_submit(slurm, steps / "job.sh", "-n", "4"), steps),
           "requeue": (_submit(slurm, requeue / "job.sh", "--requeue", "-n", "2",
                               "--open-mode=append"), requeue),
           "check": (_submit(slurm, check / "job.sh", "-n", "2"), check)}
    return {name: (job, d, _wait_job(slurm, job, 300)) for name, (job, d) in ids.items()}


@pytest.mark.slow
def test_srun_steps_train_one_cluster_each(jobs):
    """Two 2-task steps of one job at once: each one 2-replica cluster with its own run id,
    identical weights on both tasks, and only its chief writing."""
    job, directory, state = jobs["steps"]
    out = {i: directory / f"srun{i}" for i in (0, 1)}
    run_ids = set()
    for d in out.values():
        tasks = _tasks(d)
        logs = "\n".join(p.read_text()[-2000:] for p in d.glob("*.out"))
        assert len(tasks) == 2, f"{d.name}: {logs}"
        assert [t["replicas"] for t in tasks] == [2, 2], tasks
        assert sorted(t["rank"] for t in tasks) == [0, 1]
        (run_id,) = {t["run_id"] for t in tasks}
        run_ids.add(run_id)
        assert tasks[0]["weights"] == tasks[1]["weights"]
        written = sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                         if p.is_file() and p.suffix not in (".out", ".json"))
        assert written == [f"{run_id}/model.keras"], written
    # The steps started at once, so either may be step 0.
    assert run_ids == {f"slurm-{job}.0", f"slurm-{job}.1"}
    ports = {i: [int(a.rsplit(":", 1)[1]) for a in _tasks(d)[0]["cluster"]["cluster"]["worker"]]
             for i, d in out.items()}
    low, high = local_slurm.RESERVED_PORTS
    assert all(low <= p <= high for p in ports[0]), ports
    step = int(_tasks(out[1])[0]["run_id"].rsplit(".", 1)[1])
    assert ports[1] == derived_ports(int(job), step, 2), ports
    assert state == "COMPLETED"


@pytest.mark.slow
def test_cluster_check_passes_as_a_step(jobs):
    """`srun -n 2 python -m disttrain.check`: both tasks report the Slurm-derived cluster and
    pass every item, the chief's report has the step's run id, an all-reduce table and the
    URL probe, which left nothing behind."""
    job, directory, state = jobs["check"]
    outputs = [(directory / f"{task}.out").read_text() for task in (0, 1)]
    assert state == "COMPLETED", "\n---\n".join(outputs)
    for rank, output in enumerate(outputs):
        assert (f"cluster     Slurm step {job}.0: 2 training task(s); this task w{rank} "
                f"(rank {rank}") in output, output
        assert "OK: 7 items passed" in output, output
    assert f"run id      slurm-{job}.0\n" in outputs[0]
    assert "                 1 MiB" in outputs[0]
    assert "all 2 task(s) read it back, the chief removed it" in outputs[0]
    assert sorted(p.name for p in directory.iterdir()) == ["0.out", "1.out", "job.out", "job.sh"]


@pytest.mark.slow
def test_requeued_job_resumes_from_its_backup(jobs):
    """The preempted first run requeued the job; the second run resumed from its backup under
    the same run id. (That a resumed run ends with an uninterrupted run's weights is checked
    through the launchers in tests/resume/test_launch_resume.py, with the same script.)"""
    job, directory, state = jobs["requeue"]
    log = (directory / "job.out").read_text()
    task_logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                          for p in sorted(directory.glob("*.out")))
    assert "attempt 0: srun exited 75" in log, log + task_logs
    assert "attempt 1: srun exited 0" in log, log + task_logs
    assert state == "COMPLETED", log
    resumed = ("BackupAndRestore: resuming at epoch 2, batch 6 from backup-000013 "
               f"(run slurm-{job}.0)")
    assert resumed in (directory / "0-1.out").read_text(), task_logs
    assert (directory / "weights.json").exists()
    assert [p.name for p in directory.iterdir() if p.name.startswith("slurm-")] == [
        f"slurm-{job}.0"]


def _random_hostlist(rng: random.Random) -> str:
    def name() -> str:
        prefix = rng.choice(["node", "gpu-a", "n", "r1n", "cpu.x", "h_"])
        groups = []
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            parts = []
            for _ in range(rng.randint(1, 3)):
                width = rng.choice([1, 1, 2, 3])
                low = rng.randint(0, 30)
                text = str(low).zfill(width)
                if rng.random() < 0.6:
                    text += "-" + str(low + rng.randint(0, 12)).zfill(width)
                parts.append(text)
            groups.append("[" + ",".join(parts) + "]")
        if not groups:
            return prefix + str(rng.randint(0, 99))
        return prefix + (rng.choice(["", "x"])).join(groups)

    return ",".join(name() for _ in range(rng.randint(1, 4)))


def test_hostlists_expand_as_scontrol_does(slurm):
    """Generated multi-node lists (ranges, zero padding, several brackets, repeats): disttrain's
    expansion equals `scontrol show hostnames`'s; malformed lists that scontrol refuses are
    refused, and so are those where scontrol 22.05 guesses ('a[' gives 'a]', 'a[1-]' gives
    'a1'): Slurm never writes them into SLURM_STEP_NODELIST."""
    rng = random.Random(30)
    lists = [_random_hostlist(rng) for _ in range(150)] + [
        "node[01-03,07],gpu-a[1-2]", "n[8-12]", "n[098-101]", "a[1-2],a1", "[1-2]"]
    for hostlist in lists:
        shown = slurm.run(["scontrol", "show", "hostnames", hostlist])
        assert shown.returncode == 0 and shown.stdout, (hostlist, shown.stderr)
        assert expand_hostlist(hostlist) == shown.stdout.split(), hostlist
    assert sum(len(expand_hostlist(h)) > 1 for h in lists) > 120
    for hostlist in ("a[3-1]", "n[0-1]s", "a[1-2]-x,b[5]", "a[x]", "a[1-2]b"):
        shown = slurm.run(["scontrol", "show", "hostnames", hostlist])
        # scontrol exits 0 here too, printing only an error.
        assert "Invalid hostlist" in shown.stderr and not shown.stdout, hostlist
        with pytest.raises(ClusterConfigError, match="Slurm node list"):
            expand_hostlist(hostlist)
    for hostlist in ("a[", "a]", "a,,b", "a[1-]", ""):
        with pytest.raises(ClusterConfigError, match="Slurm node list"):
            expand_hostlist(hostlist)


def test_single_task_step_stays_single(slurm, tmp_path):
    """`srun -n 1`: one worker, the step's run id; no TensorFlow imported to find out."""
    code = ("import json, sys; from disttrain.cluster import Cluster; c = Cluster.from_env(); "
            "print(json.dumps([c.num_workers, c.run_id, 'tensorflow' in sys.modules]))")
    ran = slurm.run(["srun", "-n", "1", PY, "-c", code], env=ENV, cwd=REPO_ROOT)
    assert ran.returncode == 0, ran.stderr
    workers, run_id, imported_tf = json.loads(ran.stdout)
    assert workers == 1 and run_id.startswith("slurm-") and run_id.endswith(".0")
    assert not imported_tf
