"""Exact resume end to end through the launchers, also on another number of workers.

The training script (`tests/launch/workers/resume_train.py`) backs up every batch with
`disttrain.callbacks.BackupAndRestore` on a reshuffling, randomly augmented input; one worker
sends itself SIGTERM mid-epoch and every worker exits with 75. `python -m launch.local
--max-restarts 1` restarts the 2-worker group, which resumes and is preempted again, leaving
no restart; started again with `--workers 3` and the same run id, the job finishes with the
uninterrupted 2-worker run's weights. The same with the pods of a `launch.k8s` Indexed Job
(simulated in network namespaces, as in tests/launch/test_entrypoint.py): 2 pods preempted, then
the manifest regenerated with `--workers 3`, the same run id and checkpoint URL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from disttrain.errors import PREEMPTED_EXIT_CODE
from workloads import k8s_pods
# The simulated pods of tests/launch/test_entrypoint.py (`netns` skips, saying why, without root).
from workloads.pod_network import PodNetwork, kubernetes_env_here
from tests.support.pod_network import wait_for
from tests.support import REPO_ROOT

SCRIPT = "tests/launch/workers/resume_train.py"
PY = sys.executable
NOTICE = "was written on 2 workers, this run has 3"


def _script(tmp_path: Path, *args: str, backup_dir: str | None = None,
            python: str = PY) -> list[str]:
    return [python, SCRIPT, "--backup-dir", backup_dir or str(tmp_path / "{run_id}" / "backup"),
            "--out", str(tmp_path / "weights.json"), *args]


def _launch(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs `python -m launch.local ARGS` (its workers end with it, also on a timeout)."""
    return subprocess.run([PY, "-m", "launch.local", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _read_weights(path: Path) -> list:
    return json.loads(path.read_text())


def _assert_weights_close(got: list, want: list, atol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-worker `launch.local --max-restarts 1` job: its workers first train the
    uninterrupted run (weights in `reference.json`), then train with backups; worker 1 sends
    itself SIGTERM after epoch 2's 4th batch in attempt 0 and after epoch 3's 3rd in attempt
    1, which leaves no restart."""
    tmp = tmp_path_factory.mktemp("restarted")
    done = _launch("--workers", "2", "--max-restarts", "1", "--run-id", "resume-local", "--",
                   *_script(tmp, "--reference", str(tmp / "reference.json"),
                            "--sigterm", "0:1:1:3", "--sigterm", "1:1:2:2"), timeout=240)
    return tmp, done


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launch_local_restarts_a_preempted_job_where_it_stopped(restarted):
    _, done = restarted
    out, err = done.stdout, done.stderr
    assert done.returncode == PREEMPTED_EXIT_CODE, err
    assert "[w1] sending SIGTERM to myself after epoch 2, batch 4" in err
    assert "backup saved at epoch 2, batch 5; exiting with 75" in err
    assert "restarting the group on fresh ports (restart 1/1)" in err
    assert "[w0] BackupAndRestore: resuming at epoch 2, batch 6 from backup-" in out
    assert "(run resume-local)" in out
    assert "[w1] sending SIGTERM to myself after epoch 3, batch 3" in err
    assert "backup saved at epoch 3, batch 4; exiting with 75" in err
    assert "exit 75 (preempted) after" in err and "2 attempt(s) (1 restart(s))" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launch_local_resumes_the_2_worker_backup_on_3_workers(restarted):
    """Started again with `--workers 3` and the same run id, the job resumes the backup of
    its second 2-worker attempt and ends with the uninterrupted 2-worker run's weights."""
    tmp, _ = restarted
    resumed = _launch("--workers", "3", "--run-id", "resume-local", "--", *_script(tmp),
                      timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert NOTICE in resumed.stderr
    assert "[w0] BackupAndRestore: resuming at epoch 3, batch 5 from backup-" in resumed.stdout
    _assert_weights_close(_read_weights(tmp / "weights.json"), _read_weights(tmp / "reference.json"),
                          atol=1e-5)


def _k8s_pods(tmp_path: Path, workers: int, *script_args: str) -> tuple[list[int], str]:
    """Generates the Indexed Job with `python -m launch.k8s --workers N` (fixed run id and
    checkpoint URL) and runs its pods as Kubernetes would, each in a network namespace of
    its own; returns their exit codes and outputs."""
    manifest_dir = tmp_path / f"manifest-{workers}"
    subprocess.run(
        [PY, "-m", "launch.k8s", "--name", "resume", "--workers", str(workers), "--image",
         "unused", "--run-id", "resume-k8s", "--checkpoint-url", str(tmp_path / "ckpt"),
         "--peer-timeout", "60", "--output", str(manifest_dir), "--",
         *_script(tmp_path, *script_args, python="python",
                  backup_dir="$(DISTTRAIN_CHECKPOINT_URL)/{run_id}/backup")],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=30)
    documents = list(yaml.safe_load_all((manifest_dir / "resume.yaml").read_text()))
    container = k8s_pods.pod_spec(documents)["containers"][0]
    logs = [tmp_path / f"pod{workers}-{i}.log" for i in range(workers)]
    with PodNetwork(workers) as network:
        for i in range(workers):
            hostname = f"resume-{i}"
            network.publish(i, k8s_pods.dns_names(hostname, "resume", "default"))
            env = kubernetes_env_here(container, i, hostname, "default", tmp_path)
            argv = k8s_pods.pod_argv(container, env)
            assert argv[:3] == ["python", "-m", "launch.entrypoint"]
            network.start(i, argv[3:], env, logs[i])
        outputs = wait_for(network.procs, logs, timeout=200)
        codes = [p.returncode for p in network.procs]
    return codes, "\n".join(outputs)


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.usefixtures("netns")
def test_k8s_job_regenerated_with_3_workers_resumes_the_2_pod_backup(restarted, tmp_path):
    """Pod 1 of a 2-pod Job gets SIGTERM mid-epoch: both pods back up and exit 75. The Job
    generated again with `--workers 3`, the same run id and checkpoint URL resumes from that
    backup and ends with the uninterrupted 2-worker run's weights."""
    codes, output = _k8s_pods(tmp_path, 2, "--sigterm", "1:1:2")
    assert codes == [PREEMPTED_EXIT_CODE] * 2, output
    assert "backup saved at epoch 2, batch 4; exiting with 75" in output

    codes, output = _k8s_pods(tmp_path, 3)
    assert codes == [0, 0, 0], output
    assert NOTICE in output
    assert "resuming at epoch 2, batch 5 from backup-" in output and "(run resume-k8s)" in output
    _assert_weights_close(_read_weights(tmp_path / "weights.json"),
                          _read_weights(restarted[0] / "reference.json"), atol=1e-5)
