"""Bad input, end to end: every case is a real 2-worker job under `python -m launch.local`.

Each case must end non-zero within a bound, with every worker printing the same
disttrain error that names the bad value and the fix, leave the checkpoint an
earlier attempt of the same run committed byte-identical (and loadable), and
leave no process of the job behind. The cases: malformed TF_CONFIG, a missing
monitor metric, a filepath template key missing from the logs, an unbalanced
brace in the template, a read-only destination, a destination under a regular
file, a full filesystem (a real small tmpfs in a private mount namespace, full
mid-training), a port held by another listener, invalid launcher flags. A
destination whose parent directories do not exist is created (the earlier
attempt's job shows it); a bucket that does not exist (on a real GCS emulator)
is a clear error before training. A backup written by a different model
architecture is refused on every worker before training and kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from workloads import fault_training
from disttrain import storage
from disttrain.testing import LaunchedJob, function_command, run_launcher
from tests.support.processes import can_make_read_only_views, read_only_view

RUN_ID = "bad-input-run"
DESTINATION = "ckpt/sub"
FILEPATH = f"{DESTINATION}/m-{{epoch}}.keras"
WIDTH = 256
JOB_TIMEOUT = 90
PAGE = 4096
# Room left on the tmpfs besides the earlier checkpoint: enough for the write probe,
# the pending marker and the manifest, far too little for another checkpoint.
TMPFS_SLACK = 16 * PAGE

needs_namespaces = pytest.mark.skipif(not can_make_read_only_views(),
                                      reason="needs root and unshare --mount")


def _command(**kwargs) -> list[str]:
    return function_command(fault_training.checkpoint_train,
                            {"filepath": FILEPATH, "width": WIDTH, **kwargs})


def _launch(cwd: Path, command: list[str], *flags: str,
            wrap: Callable[[list[str]], list[str]] | None = None,
            env: dict[str, str] | None = None) -> LaunchedJob:
    return run_launcher(["--workers", "2", "--run-id", RUN_ID, "--grace", "2", *flags, "--",
                         *command], timeout=JOB_TIMEOUT, cwd=cwd, wrap=wrap, env=env)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A directory whose `ckpt/sub/` holds 2 committed checkpoints of run RUN_ID.

    Written by a real job whose destination's parent directories did not exist.
    """
    root = tmp_path_factory.mktemp("earlier")
    job = _launch(root, _command(epochs=2))
    assert job.returncode == 0 and not job.survivors, job.report()
    return root


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_destination_whose_parent_does_not_exist_is_created(earlier):
    names = sorted(os.listdir(earlier / DESTINATION))
    assert names == ["best.json", "m-1.keras", "m-2.keras"], names
    manifest = json.loads((earlier / DESTINATION / "best.json").read_text())
    assert manifest["run_id"] == RUN_ID and manifest["path"] == f"{DESTINATION}/m-2.keras"


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: how to run the job, and the error every named worker must print.

    Attributes:
        command: the workers' command (run in the case's directory).
        error: a regex for `<disttrain error class>: <message>` each of `workers` prints.
        flags: extra launcher flags.
        wrap: given the case's directory and a worker command, the command to run.
        workers: the labels that must print `error` (none for launcher errors).
        exit_code: the launcher's expected exit code.
        within: seconds the job may take.
        launcher_error: a regex the launcher's own stderr must match.
        root_cause_only: only the worker that failed first must print `error`
            (the others may be stopped by the launcher before they get as far);
            any other that prints an error prints the same.
        env: extra environment of the job. The held-port case runs with
            TensorFlow's error lines on (TF_CPP_MIN_LOG_LEVEL=2, what the
            launcher sets when the user has not): one of them names the port.
    """

    command: list[str]
    error: str = ""
    flags: tuple[str, ...] = ()
    wrap: Callable[[Path, list[str]], list[str]] | None = None
    workers: tuple[str, ...] = ("w0", "w1")
    exit_code: int = 1
    within: float = 60.0
    launcher_error: str = ""
    root_cause_only: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def _with_env(name: str, value: str) -> Callable[[Path, list[str]], list[str]]:
    return lambda _root, command: ["env", f"{name}={value}", *command]


def _read_only_destination(root: Path, command: list[str]) -> list[str]:
    return read_only_view(root / "ckpt", command)


BAD_TF_CONFIG = json.dumps({"cluster": {"worker": "127.0.0.1:2222,127.0.0.1:2223"},
                            "task": {"type": "worker", "index": 0}})

CASES = {
    "malformed TF_CONFIG": Case(
        _command(), wrap=_with_env("TF_CONFIG", BAD_TF_CONFIG), root_cause_only=True,
        error=r"ClusterConfigError: TF_CONFIG cluster\.worker='127\.0\.0\.1:2222,127\.0\.0\.1:2223'"
              r": must be a list of 'host:port' strings\. Fix: write \"worker\": \[\"host:port\"",
    ),
    "missing monitor metric": Case(
        _command(monitor="val_auc"),
        error=r"CallbackConfigError: ModelCheckpoint\(monitor='val_auc'\): 'val_auc' is not in "
              r"the logs\. Available: accuracy, loss, val_accuracy, val_loss\..* Fix: monitor "
              r"one of the available metrics",
    ),
    "template key missing from the logs": Case(
        _command(filepath=f"{DESTINATION}/m-{{val_acc:.2f}}.keras"),
        error=r"CallbackConfigError: ModelCheckpoint\(filepath='ckpt/sub/m-\{val_acc:\.2f\}\.keras'"
              r"\) uses \['val_acc'\], which are not in the logs\. Available: accuracy, loss, "
              r"val_accuracy, val_loss, plus epoch, batch, run_id\. Fix: use available names",
    ),
    "unbalanced brace in the filepath template": Case(
        _command(filepath=f"{DESTINATION}/m-{{epoch.keras"),
        error=r"StorageConfigError: ModelCheckpoint\(filepath='ckpt/sub/m-\{epoch\.keras'\) is "
              r"not a valid template: .*\. Fix: balance the braces",
    ),
    "read-only destination": Case(
        _command(), wrap=_read_only_destination,
        error=r"StorageError: ModelCheckpoint\.preflight failed on w0: StorageError: destination "
              r"'ckpt/sub' is not writable: OSError: \[Errno 30\] Read-only file system.*\. "
              r"Fix: check the permissions of the destination",
    ),
    "destination under a regular file": Case(
        _command(filepath=f"{DESTINATION}/m-1.keras/m-{{epoch}}.keras"),
        error=r"StorageError: ModelCheckpoint\.preflight failed on w0: StorageError: destination "
              r"'ckpt/sub/m-1\.keras' is not writable: FileExistsError: \[Errno 17\] File exists: "
              r"'.*/ckpt/sub/m-1\.keras'\. Fix: a file and a "
              r"directory clash on this path; remove the clashing entry or choose another path",
    ),
    "port held by another listener": Case(
        _command(hold_port_of_rank=1), flags=("--grace", "0.5"), workers=(),
        env={"TF_CPP_MIN_LOG_LEVEL": "2"},
        launcher_error=r"w1 could not bind its port \(.*Failed to add port to server: No address "
                       r"added out of total 1 resolved for '0\.0\.0\.0:\d+'\): relaunching on "
                       r"fresh ports.*\(3/3\)(.|\n)*"
                       r"summary of bad-input-run: exit 1 after .*4 attempt\(s\) "
                       r"\(3 port-clash relaunch\(es\)\)",
    ),
    "invalid launcher flag --workers 0": Case(
        _command(), flags=("--workers", "0"), workers=(), exit_code=2, within=10,
        launcher_error=r"argument --workers: must be at least 1, got 0",
    ),
    "invalid launcher flag --max-restarts=-1": Case(
        _command(), flags=("--max-restarts=-1",), workers=(), exit_code=2, within=10,
        launcher_error=r"argument --max-restarts: must be at least 0, got -1",
    ),
}


def _worker_errors(stderr: str) -> dict[str, list[str]]:
    """The `disttrain.errors.<Class>: <message>` lines each worker printed, by label."""
    found: dict[str, list[str]] = {}
    for label, line in re.findall(r"^\[(w\d+)\] disttrain\.errors\.(\w+Error: .*)$", stderr,
                                  re.MULTILINE):
        found.setdefault(label, []).append(line)
    return found


def _assert_failed_clearly(case: Case, job: LaunchedJob) -> None:
    assert not job.timed_out and job.returncode == case.exit_code, job.report()
    assert job.seconds < case.within, job.report()
    assert job.survivors == [], job.report()
    if case.launcher_error:
        assert re.search(case.launcher_error, job.stderr), job.report()
    errors = _worker_errors(job.stderr)
    labels = list(case.workers)
    if case.root_cause_only:
        culprit = re.search(r"^\[launch\] (w\d+) failed first", job.stderr, re.MULTILINE)
        assert culprit, job.report()
        labels = [culprit[1], *(label for label in case.workers if label in errors)]
    lines = [errors.get(label, [""])[-1] for label in labels]
    for line in lines:
        assert re.match(case.error, line), (line, job.report())
    assert len(set(lines)) <= 1, f"workers disagree: {lines}"


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_clearly_and_keeps_the_earlier_checkpoint(name, earlier, tmp_path):
    case = CASES[name]
    if case.wrap is _read_only_destination and not can_make_read_only_views():
        pytest.skip("needs root and unshare --mount")
    shutil.copytree(earlier / "ckpt", tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    command = case.wrap(tmp_path, case.command) if case.wrap else case.command
    job = _launch(tmp_path, command, *case.flags, env=case.env)
    _assert_failed_clearly(case, job)
    assert _snapshot(tmp_path / "ckpt") == before


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_bucket_that_does_not_exist_is_a_clear_error_before_training(gcs, tmp_path):
    """An object store has no directories to create: a missing bucket must be named, with the fix."""
    job = _launch(tmp_path, _command(filepath="gs://no-such-bucket-disttrain/{run_id}/m.keras"),
                  env={storage.ENV_STORAGE_EMULATOR_HOST: gcs.endpoint})
    case = Case(
        [], error=r"StorageError: ModelCheckpoint\.preflight failed on w0: StorageError: "
                  r"destination 'gs://no-such-bucket-disttrain/bad-input-run' is not writable: "
                  r".*Fix: check the URL; if the bucket does not exist, create it",
    )
    _assert_failed_clearly(case, job)


def _tmpfs_size(directory: Path) -> int:
    used = sum(-(-len(data) // PAGE) * PAGE for data in _snapshot(directory).values())
    return used + TMPFS_SLACK


@pytest.mark.slow
@pytest.mark.timeout(150)
@needs_namespaces
def test_full_filesystem_mid_training(earlier, tmp_path):
    """A tmpfs just big enough for the earlier checkpoints; the first better epoch cannot be saved.

    The job restores the earlier attempt's best value (same run id), so its first
    save comes after 2 or 3 epochs: mid-training. The tmpfs lives in a private
    mount namespace around the launcher; its content is copied out before it goes.
    """
    destination, after = tmp_path / "ckpt", tmp_path / "after"
    destination.mkdir()
    after.mkdir()
    before = _snapshot(earlier / "ckpt")
    size = _tmpfs_size(earlier / "ckpt")

    def in_full_tmpfs(launcher: list[str]) -> list[str]:
        d, a, e = (shlex.quote(str(p)) for p in (destination, after, earlier / "ckpt"))
        script = (f"mount -t tmpfs -o size={size} disttrain-full {d} && cp -a {e}/. {d}/ && "
                  f"{shlex.join(launcher)}; rc=$?; cp -a {d}/. {a}/; exit $rc")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    job = _launch(tmp_path, _command(epochs=5), wrap=in_full_tmpfs)
    case = Case(
        [], error=r"StorageError: ModelCheckpoint\.save failed on w0: StorageError: writing "
                  r"'ckpt/sub/m-[23]\.keras' failed: OSError: \[Errno 28\] No space left on "
                  r"device\. Fix: free space on the destination or write somewhere with more "
                  r"room\.",
    )
    _assert_failed_clearly(case, job)
    assert _snapshot(after) == before, "nothing committed before was touched, nothing added"
    keras = pytest.importorskip("keras")
    manifest = json.loads((after / "sub" / "best.json").read_text())
    model = keras.models.load_model(after / "sub" / os.path.basename(manifest["path"]))
    assert model.count_params() == 6 * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH + WIDTH + 1


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_backup_of_another_architecture_is_refused_on_every_worker_and_kept(tmp_path):
    """A job killed mid-run leaves a backup of 16-unit layers; the same run restarted with
    32-unit layers refuses it on both workers before training and leaves it as it was."""
    backup = tmp_path / "backup"
    killed = run_launcher(
        ["--workers", "2", "--run-id", RUN_ID, "--grace", "2", "--", *function_command(
            fault_training.fault_train,
            {"result_dir": str(tmp_path), "backup_dir": str(backup), "width": 16})],
        timeout=JOB_TIMEOUT, cwd=tmp_path,
        env={fault_training.ENV_FAULT_RANK: "1",
             fault_training.ENV_FAULT_STEP: str(2 * fault_training.STEPS_PER_EPOCH + 2)})
    assert killed.returncode == 137 and not killed.survivors, killed.report()
    before = _snapshot(backup)
    assert before, "the killed job left a backup"
    case = Case(
        command=function_command(fault_training.fault_train, {
            "result_dir": str(tmp_path), "backup_dir": str(backup), "width": 32}),
        error=r"CallbackConfigError: BackupAndRestore\.restore failed on w0: CallbackConfigError: "
              r"BackupAndRestore: the backup .* was written by a different model or optimizer "
              r"\(variable #0 is .* \(6, 16\) float32 in the backup, .* \(6, 32\) float32 in "
              r"this model\)\. Nothing was loaded .* Fix: give this model its own backup_dir",
        within=60.0)
    _assert_failed_clearly(case, _launch(tmp_path, case.command))
    assert _snapshot(backup) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("build, owner", [
    (lambda callbacks: callbacks.BackupAndRestore("backup/{epoch}"),
     r"BackupAndRestore\(backup_dir='backup/\{epoch\}'\)"),
    (lambda callbacks: callbacks.ModelCheckpoint("ckpt/{epoch}/m.keras"),
     r"ModelCheckpoint\(filepath='ckpt/\{epoch\}/m\.keras'\)"),
])
def test_a_directory_with_fields_besides_run_id_is_refused_when_the_callback_is_made(build, owner):
    """Both callbacks expand `{run_id}` the same way: another field in the directory is a clear
    error naming the argument when the callback is built, not a KeyError when training starts."""
    from disttrain import callbacks
    from disttrain.errors import CallbackConfigError

    with pytest.raises(CallbackConfigError, match=owner + r": the directory uses \['epoch'\]; "
                                                   r"only \{run_id\} may appear there.*Fix: "):
        build(callbacks)
