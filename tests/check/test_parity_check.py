"""`python -m disttrain.check parity`: a script that trains alike in one process and on 2
workers is reported equal; one with BatchNormalization without synchronized=True differs
and the report names the variables and the cause."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from disttrain.check import parity
from disttrain.testing import kill_group, worker_env
from tests.support import REPO_ROOT

SCRIPT = str(REPO_ROOT / "tests" / "scripts" / "parity_train.py")
VARIANTS = ((), ("--batchnorm",))
"""The script arguments of the two checks."""


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Both checks, started together (each a one-process run, then a 2-worker cluster,
    which leave a core idle part of the time, so the two overlap well on 2 cores): script
    arguments -> a function waiting for that check's finished process."""
    directory = tmp_path_factory.mktemp("parity-checks")
    procs = {}
    for args in VARIANTS:
        logs = [directory / f"{'-'.join(args) or 'plain'}.{name}" for name in ("out", "err")]
        with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
            # 12 steps: past the first epoch of 8, so the second epoch's order counts too.
            procs[args] = (logs, subprocess.Popen(
                [sys.executable, "-m", "disttrain.check", "parity", "--steps", "12", "--",
                 sys.executable, SCRIPT, *args], cwd=REPO_ROOT, env=worker_env(),
                stdout=stdout, stderr=stderr, start_new_session=True))

    def finished(args: tuple[str, ...]) -> subprocess.CompletedProcess:
        (stdout, stderr), proc = procs[args]
        proc.wait(timeout=400)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout.read_text(),
                                           stderr.read_text())

    yield finished
    for _, proc in procs.values():
        kill_group(proc)


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_a_script_that_trains_alike_matches(checks):
    """Shuffled NumPy arrays under a global seed, Adam: 12 steps on 2 workers are within
    the tolerance of one process (measured: 5e-7 of the weights' movement), exit 0."""
    run = checks(())
    assert run.returncode == parity.EXIT_MATCH, run.stdout + run.stderr[-5000:]
    assert "workers bit-identical: yes" in run.stdout
    assert "MATCH: every variable within 0.001" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_batchnorm_without_synchronized_differs_and_is_named(checks):
    """The same script with a BatchNormalization: exit 1, the first differing variable is the
    first layer's kernel (measured: 0.58 of its movement), and the cause and its fix
    (synchronized=True) are named."""
    run = checks(("--batchnorm",))
    assert run.returncode == parity.EXIT_DIFFER, run.stdout + run.stderr[-5000:]
    assert "DIFFER:" in run.stdout
    assert "  sequential/dense/kernel: max difference" in run.stdout
    assert ("BatchNormalization 'batch_normalization' without synchronized=True"
            in run.stdout)
    assert "BatchNormalization(synchronized=True)" in run.stdout


def test_compare_measures_differences_against_the_movement():
    """A difference of 1e-4 of a variable's movement passes, 1e-2 does not; workers that
    differ from each other are reported; the first differing variable comes first."""
    initial = {"initial/a": np.zeros(3), "initial/b": np.ones(2)}
    one = {**initial, "final/a": np.full(3, 0.5), "final/b": np.full(2, 2.0)}

    def capture(a_off: float, b_off: float) -> dict:
        return {**initial, "final/a": one["final/a"] + a_off, "final/b": one["final/b"] + b_off}

    close = parity.compare(one, [capture(5e-5, 0.0), capture(5e-5, 0.0)])
    assert close["match"] and close["workers_identical"] and close["largest"] < 1e-3
    far = parity.compare(one, [capture(0.0, 1e-2), capture(0.0, 1e-2)])
    assert not far["match"] and [p for p, _ in far["differing"]] == ["b"]
    split = parity.compare(one, [capture(0.0, 0.0), capture(1e-9, 0.0)])
    assert not split["match"] and not split["workers_identical"]


def test_the_dispatcher_lists_its_subcommands():
    run = subprocess.run([sys.executable, "-m", "disttrain.check", "nosuch"], cwd=REPO_ROOT,
                         env=worker_env(), capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 2
    assert all(f"  {name} " in run.stderr for name in ("cluster", "parity", "gpu"))


def test_a_script_that_never_fits_is_a_failure_that_says_why():
    run = subprocess.run([sys.executable, "-m", "disttrain.check", "parity", "--",
                          sys.executable, "-c", "print('no training here')"], cwd=REPO_ROOT,
                         env=worker_env(), capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == parity.EXIT_FAILED, run.stderr
    assert "must call disttrain.strategy()" in run.stderr and "no training here" in run.stderr
