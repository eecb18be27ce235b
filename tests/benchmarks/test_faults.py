"""Fault injection: one fault at a random moment of a real 2-worker job, per kind.

Each seed picks (victim rank, global step) with `random.Random(seed)`; on
attempt 0 the victim kills itself with SIGKILL after that step (a callback of
`workloads.fault_training.fault_train`). Under `launch.local --max-restarts 1` with
`BackupAndRestore(save_freq="epoch")` the job must then succeed on attempt 1,
resuming at the epoch the kill interrupted, run the planned epochs in all, and
end with the weights of an uninterrupted run (the data order is deterministic).
Without restarts it must end within a bound with exit 137, the launcher naming
the victim and the signal.

The other kinds (`workloads.fault_training.KINDS`), one seed each: a worker
frozen by SIGSTOP and the chief SIGKILLed just before or after a rename of a
ModelCheckpoint or BackupAndRestore commit must recover the same way, with no
temp file, damaged commit or unlisted checkpoint left; a full checkpoint disk
on the chief must fail the job with the same clear error on every worker and
every earlier checkpoint intact; a worker cut off the network (every packet it
sends dropped) must be noticed by every worker within a bound and recovered
exactly; the GCS emulator holding gs:// checkpoints killed during a save and
restarted 3 s later must leave a job that ends like an uninterrupted one, every
manifest naming complete objects; kept down 45 s, past gcsfs's retries, it must
fail every worker of attempt 0 with a StorageError naming the gs:// URL, and the
restarted attempt must resume from the last backup and end like an uninterrupted
one; a job run as simulated pods (a network namespace each) one of whose links is
set down must be noticed by every pod within a bound and recovered exactly, with no
namespace left, also when it times out. `python -m benchmarks.faults --kind all`
runs many more seeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from benchmarks.fault_workloads import (
    CUT_NOTICED_WITHIN,
    GCSFS_GIVES_UP_AFTER,
    STORAGE_DOWN_PAST_RETRIES,
    FaultRun,
    cgroup2_root,
    detection_seconds,
    disk_full_problems,
    link_down_problems,
    network_cut_problems,
    plan_fault,
    restart_problems,
    restart_seconds,
    run_fault_job,
    run_pod_fault_job,
    storage_kill_problems,
    storage_problems,
    with_outage,
    worker_errors,
)
from workloads.fault_training import (
    CHIEF_KILL_BACKUP,
    CHIEF_KILL_COMMIT,
    DISK_FULL,
    LINK_DOWN,
    NETWORK_CUT,
    STORAGE_KILL,
    WORKER_STOP,
)

WORKERS = 2
EPOCHS = 4
SEEDS = range(2)
JOB_TIMEOUT = 120
# Bounds on a loaded 2-core machine: one attempt takes about 10 s, a restarted job about 25 s.
RESTARTED_WITHIN = 90
FAILED_WITHIN = 45


# A frozen peer is noticed by TensorFlow's heartbeat; with the restart, about as fast as a kill.
STOPPED_RESTARTED_WITHIN = 60


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> FaultRun:
    """The same job without a fault (weights identical on every worker)."""
    run = run_fault_job(str(tmp_path_factory.mktemp("uninterrupted")), WORKERS, EPOCHS,
                        fault=None, max_restarts=0, timeout=JOB_TIMEOUT)
    assert run.job.returncode == 0 and not run.job.survivors, run.job.report()
    assert [run.results[r]["epochs_run"] for r in range(WORKERS)] == [EPOCHS] * WORKERS
    assert run.results[0]["weights"] == run.results[1]["weights"]
    assert run.storage == [] and len(run.listed) == EPOCHS, (run.storage, run.listed)
    return run


@pytest.fixture(scope="module")
def uninterrupted(reference) -> list:
    """The final weights of the job without a fault."""
    return reference.results[0]["weights"]


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("seed", SEEDS)
def test_a_killed_worker_is_restarted_and_the_job_ends_like_an_uninterrupted_one(
        seed, uninterrupted, tmp_path):
    fault = plan_fault(seed, WORKERS, EPOCHS)
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                        timeout=JOB_TIMEOUT)
    assert restart_problems(run, fault, WORKERS, EPOCHS, uninterrupted) == [], run.job.report()
    assert run.job.seconds < RESTARTED_WITHIN, run.job.report()
    assert re.search(rf"^\[launch\]   w{fault.rank} +0 .* 137\*$", run.job.stderr, re.MULTILINE), (
        "the summary marks the victim's SIGKILL as the root cause of attempt 0\n"
        + run.job.report())


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_without_restarts_the_job_fails_fast_naming_the_killed_worker_and_signal(tmp_path):
    fault = plan_fault(len(SEEDS), WORKERS, EPOCHS)
    victim, step = fault.rank, fault.step
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=0,
                        timeout=JOB_TIMEOUT)
    job = run.job
    assert job.returncode == 137 and not job.survivors, job.report()
    assert job.seconds < FAILED_WITHIN, job.report()
    assert run.fault is not None and run.fault["step"] == step
    assert f"[launch] w{victim} failed first: exited with 137 (SIGKILL)" in job.stderr, (
        job.report())
    assert "exit 137 (SIGKILL)" in job.stderr and "1 attempt(s)" in job.stderr
    assert run.results == {}, "no worker finished training"


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
# chief-kill-commit seed 14 kills the chief before the first ModelCheckpoint file is renamed
# into place: its temp files stayed after the restarted job until CheckpointManager.open
# removed them without an index too.
@pytest.mark.parametrize("kind, seed", [(WORKER_STOP, 0), (CHIEF_KILL_COMMIT, 14),
                                        (CHIEF_KILL_BACKUP, 1)])
def test_a_frozen_worker_or_a_chief_killed_mid_commit_is_recovered_exactly(
        kind, seed, reference, tmp_path):
    fault = plan_fault(seed, WORKERS, EPOCHS, kind, reference.renames)
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                        timeout=JOB_TIMEOUT)
    assert restart_problems(run, fault, WORKERS, EPOCHS, reference.results[0]["weights"]) == [], (
        run.job.report())
    assert run.job.seconds < RESTARTED_WITHIN, run.job.report()
    if kind == WORKER_STOP:
        assert restart_seconds(run) < STOPPED_RESTARTED_WITHIN, run.job.report()


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_full_checkpoint_disk_fails_every_worker_clearly_and_keeps_earlier_checkpoints(
        tmp_path):
    fault = plan_fault(0, WORKERS, EPOCHS, DISK_FULL)  # step 13: two checkpoints before
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=0,
                        timeout=JOB_TIMEOUT)
    assert disk_full_problems(run, fault, WORKERS) == [], run.job.report()
    assert run.job.seconds < FAILED_WITHIN, run.job.report()


def _network_cut_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network-cut needs root (a cgroup and an iptables rule)"
    if shutil.which("iptables") is None:
        return "network-cut needs iptables"
    if cgroup2_root() is None:
        return "network-cut needs a cgroup v2 hierarchy (none in /proc/mounts)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_worker_cut_off_the_network_is_noticed_by_every_worker_and_recovered_exactly(
        reference, tmp_path):
    unavailable = _network_cut_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    fault = plan_fault(3, WORKERS, EPOCHS, NETWORK_CUT)  # the chief, after step 19
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                        timeout=JOB_TIMEOUT)
    assert restart_problems(run, fault, WORKERS, EPOCHS, reference.results[0]["weights"]) == [], (
        run.job.report())
    assert network_cut_problems(run, WORKERS, CUT_NOTICED_WITHIN) == [], (
        detection_seconds(run), run.job.report())
    assert "CoordinationService/Heartbeat" in run.job.stderr, run.job.report()
    assert run.job.seconds < RESTARTED_WITHIN, run.job.report()
    ours = f"disttrain-netcut-{os.getpid()}-"
    rules = subprocess.run(["iptables", "-w", "-S", "OUTPUT"], capture_output=True, text=True,
                           check=True).stdout
    assert ours not in rules, f"the cut's rule was left: {rules}"
    assert not [d for d in os.listdir(cgroup2_root()) if d.startswith(ours)], "cgroup left"


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_storage_server_killed_mid_save_and_restarted_leaves_the_job_and_its_commits_whole(
        uninterrupted, tmp_path):
    fault = plan_fault(3, WORKERS, EPOCHS, STORAGE_KILL)  # after step 12, down 3 s: retried
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                        timeout=JOB_TIMEOUT)
    assert storage_kill_problems(run, fault, WORKERS, EPOCHS, uninterrupted) == [], (
        run.job.report())
    assert run.listed == [f"model-0{e}.weights.h5" for e in range(1, EPOCHS + 1)], run.listed
    assert run.job.seconds < RESTARTED_WITHIN, run.job.report()


# Attempt 0, gcsfs's retries (31-36 s), the restart and attempt 1: 77-145 s on the loaded
# 2-core machine (`--storage-down 45`, 5 seeds).
OUTAGE_RESTARTED_WITHIN = 150


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_a_storage_outage_past_gcsfs_retries_fails_every_worker_clearly_and_the_restart_resumes(
        uninterrupted, tmp_path):
    fault = with_outage(plan_fault(3, WORKERS, EPOCHS, STORAGE_KILL), STORAGE_DOWN_PAST_RETRIES)
    run = run_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                        timeout=OUTAGE_RESTARTED_WITHIN + 30)
    assert storage_kill_problems(run, fault, WORKERS, EPOCHS, uninterrupted) == [], (
        run.job.report())
    assert run.job.returncode == 0 and "2 attempt(s) (1 restart(s))" in run.job.stderr, (
        run.job.report())
    errors = worker_errors(run.job.stderr, WORKERS)
    assert sorted(errors) == list(range(WORKERS)), run.job.report()
    for error in errors.values():
        assert error.startswith("StorageError") and "gs://disttrain-faults/" in error, errors
    assert sorted(attempt for _, attempt in run.failed) == [0] * WORKERS, run.failed
    # One call's retries, not a second call's after them (the emulator is back at +45 s).
    raised = max(run.failed.values()) - run.fault["time"]
    assert raised < GCSFS_GIVES_UP_AFTER + 8, f"fit raised {raised:.1f}s after the kill"
    assert [run.results[r]["attempt"] for r in range(WORKERS)] == [1] * WORKERS
    # Killed during epoch 3's saves (after step 12): attempt 1 resumes from a committed backup.
    assert all(run.epochs[r][-1] == (1, EPOCHS - 1) for r in range(WORKERS)), run.epochs
    assert not run.ended_while_down and run.storage == [], run.storage
    assert run.listed == [f"model-0{e}.weights.h5" for e in range(1, EPOCHS + 1)], run.listed
    assert run.job.seconds < OUTAGE_RESTARTED_WITHIN, run.job.report()


def test_the_storage_check_reads_gcs_and_finds_a_manifest_naming_a_missing_object(
        gcs, tmp_path):
    """What `storage_kill_problems` relies on to see a torn save on gs://."""
    import uuid

    from disttrain import storage

    root = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
    backup = f"{root}/backup-run/backup-000001"
    (tmp_path / "part.json").write_text("{}")
    part = str(tmp_path / "part.json")
    storage.commit_checkpoint(backup, {"worker-0.json": part, "worker-1.json": part})
    assert storage_problems(root) == []
    storage.remove(f"{backup}/worker-1.json")
    assert storage_problems(root) == ["damaged commit: worker-1.json is missing"]


def test_the_storage_check_finds_leftovers_damaged_commits_and_unlisted_checkpoints(tmp_path):
    """What `restart_problems` and `disk_full_problems` rely on to see a torn save."""
    import h5py

    from disttrain import storage

    checkpoints, backup = tmp_path / "checkpoints", tmp_path / "backup-run" / "backup-000001"
    checkpoints.mkdir()
    with h5py.File(checkpoints / "model-01.weights.h5", "w") as f:
        f["w"] = [1.0]
    (checkpoints / "best.json").write_text(json.dumps(
        {"checkpoints": [{"path": str(checkpoints / "model-01.weights.h5")}]}))
    (tmp_path / "part.json").write_text("{}")
    storage.commit_checkpoint(str(backup), {"worker-0.json": str(tmp_path / "part.json")})
    assert storage_problems(str(tmp_path)) == []

    (checkpoints / ".model-02.weights.h5.tmp-0123456789abcdef.weights.h5").write_text("")
    (checkpoints / "model-02.weights.h5").write_text("half")
    (backup / "worker-0.json").write_text('{"torn": 1}')
    (checkpoints / "model-01.weights.h5").write_text("torn")
    problems = "\n".join(storage_problems(str(tmp_path)))
    assert "left behind: " in problems and ".tmp-0123456789abcdef" in problems
    assert "unlisted checkpoint visible: " in problems and "model-02.weights.h5" in problems
    assert "damaged commit: " in problems and "worker-0.json" in problems
    assert "lists " in problems and "model-01.weights.h5, unreadable" in problems


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.usefixtures("netns")
def test_a_pod_whose_link_is_set_down_is_noticed_by_every_pod_and_recovered_exactly(
        uninterrupted, tmp_path):
    """The job as the pods of a generated JobSet, each in a network namespace of its own:
    the chief's link set down after step 19, every pod's fit raises by itself within the
    bound, every pod restarts once and the job ends with the `launch.local` reference's
    weights; no namespace, link, /etc/netns entry or process is left."""
    fault = plan_fault(3, WORKERS, EPOCHS, LINK_DOWN)  # the chief, after step 19
    run = run_pod_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                            timeout=JOB_TIMEOUT)
    assert restart_problems(run, fault, WORKERS, EPOCHS, uninterrupted) == [], run.job.report()
    assert link_down_problems(run, WORKERS, CUT_NOTICED_WITHIN) == [], (
        detection_seconds(run), run.job.report())
    assert sorted(detection_seconds(run)) == [0, 1], detection_seconds(run)
    assert "CoordinationService/Heartbeat" in run.job.stderr, run.job.report()
    assert run.job.seconds < RESTARTED_WITHIN, run.job.report()


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("netns")
def test_the_pod_driver_leaves_no_namespace_or_process_when_the_job_times_out(tmp_path):
    fault = plan_fault(3, WORKERS, EPOCHS, LINK_DOWN)
    run = run_pod_fault_job(str(tmp_path), WORKERS, EPOCHS, fault=fault, max_restarts=1,
                            timeout=6)
    assert run.job.timed_out and run.job.returncode is None, run.job.report()
    assert "1 attempt(s)" in run.job.stderr and "timed out; killing every pod" in run.job.stderr
    assert run.job.survivors == [] and run.left_behind == [], (run.job.survivors,
                                                               run.left_behind)


def test_the_link_down_check_finds_a_missing_cut_a_late_or_missed_notice_and_leftovers():
    """What `link_down_problems` relies on to fail a seed (no processes: a made-up run)."""
    from disttrain.testing import LaunchedJob

    job = LaunchedJob(0, "", "", 1.0, False, [])
    run = FaultRun(job, {}, {}, {"time": 100.0}, {}, {}, "", [], [], failed={(0, 0): 131.0},
                   left_behind=["network namespace dtld-1-p0"])
    assert link_down_problems(run, WORKERS, CUT_NOTICED_WITHIN) == [
        "workers [1] did not notice the cut themselves",
        "noticed the cut later than 30s: {0: 31.0}",
        "the driver never set the victim's link down",
        "left behind: network namespace dtld-1-p0"]
    run.failed, run.cut_at, run.left_behind = {(0, 0): 108.0, (1, 0): 109.0}, 100.02, []
    assert link_down_problems(run, WORKERS, CUT_NOTICED_WITHIN) == []


def test_an_outage_set_by_hand_keeps_the_seeds_draws_and_only_for_storage_kill():
    """`--storage-down` changes the outage only: `plan_fault` draws what it drew before."""
    fault = plan_fault(3, WORKERS, EPOCHS, STORAGE_KILL)
    assert fault.describe() == "w0 step 12 +0.24s down 5.7s"
    longer = with_outage(fault, STORAGE_DOWN_PAST_RETRIES)
    assert longer.describe() == "w0 step 12 +0.24s down 45.0s"
    assert longer.env() == fault.env()
    with pytest.raises(ValueError, match="storage-kill"):
        with_outage(plan_fault(3, WORKERS, EPOCHS), STORAGE_DOWN_PAST_RETRIES)
