"""The supported Keras/TensorFlow range: checked at `strategy()`, and true for an older pair."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disttrain.errors import KerasCompatError
from disttrain.keras_compat import versions
from tests.support import REPO_ROOT

OLDER_PAIR = "tf2.19-keras3.10"
"""The pair CI runs besides the default: the oldest supported Keras."""


def _strategy_after(setup: str) -> subprocess.CompletedProcess:
    """Runs `setup`, then `disttrain.strategy()`, in a fresh single process."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    code = f"{setup}\nimport disttrain\ndisttrain.strategy()\nprint('strategy created')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("keras_version, tensorflow_version", [
    ("3.10.0", "2.16.2"), ("3.15.1", "2.21.0"), ("3.16.0.dev2026102704", "2.21.0"),
    ("3.16.0.dev2026102704", "2.22.0rc0")])
def test_supported_versions_pass_the_check(keras_version, tensorflow_version):
    versions.check(keras_version, tensorflow_version)


@pytest.mark.parametrize("keras_version, tensorflow_version", [
    ("3.3.3", "2.16.2"), ("3.8.0", "2.18.1"), ("3.9.2", "2.19.1"),
    ("3.17.0.dev2027010104", "2.21.0"),
    ("2.15.0", "2.15.1"), ("3.15.1", "2.15.1"), ("3.15.1", "2.23.0rc0")])
def test_undeclared_versions_name_both_versions_the_range_and_the_fix(
        keras_version, tensorflow_version):
    with pytest.raises(KerasCompatError) as raised:
        versions.check(keras_version, tensorflow_version)
    message = str(raised.value)
    assert f"keras=={keras_version} and tensorflow=={tensorflow_version}" in message
    assert "Supported: keras>=3.10,<3.17" in message and "tensorflow>=2.16,<2.23" in message
    assert "Fix: pip install 'keras>=3.10,<3.17' 'tensorflow>=2.16,<2.23'" in message


def test_the_matrix_covers_both_ends_of_the_declared_range():
    """`tests.support.matrix.PAIRS` and `versions.py` agree: supported pairs pass the check,
    refused ones do not, and the oldest and newest Keras and TensorFlow are run."""
    from tests.support import matrix

    supported = [p for p in matrix.PAIRS if p.supported]
    for pair in supported:
        versions.check(pair.keras, pair.tensorflow)
    for pair in set(matrix.PAIRS) - set(supported):
        with pytest.raises(KerasCompatError):
            versions.check(pair.keras, pair.tensorflow)
    assert {versions.release(p.keras) for p in supported} >= set(versions.KERAS)
    assert {versions.release(p.tensorflow) for p in supported} >= set(versions.TENSORFLOW)
    assert OLDER_PAIR in {p.name for p in supported}


def test_an_undeclared_keras_is_a_clear_error_before_training():
    """What a user with Keras 3.3 sees (the matrix also installs a real one): the
    error names the installed versions, and no strategy is created."""
    result = _strategy_after("import keras\nkeras.__version__ = '3.3.3'")
    assert result.returncode != 0, result.stdout
    assert "KerasCompatError: disttrain is not tested with keras==3.3.3 and tensorflow==" \
        in result.stderr, result.stderr[-2000:]
    assert "strategy created" not in result.stdout


def test_a_fix_whose_target_is_missing_is_a_clear_error():
    """A renamed trainer class (as Keras 3.16 renamed `TensorFlowTrainer`) stops
    `strategy()` with the fix named, instead of training without it."""
    result = _strategy_after(
        "import keras\nfrom disttrain.keras_compat import detection\n"
        "delattr(detection.tf_trainer(), detection.trainer_class().__name__)")
    assert result.returncode != 0, result.stdout
    assert ("KerasCompatError: keras_compat fix 'symbolic_build_local_batch' cannot find the "
            "Keras code it patches in keras==") in result.stderr, result.stderr[-2000:]
    assert "apply(skip=('symbolic_build_local_batch',))" in result.stderr


def test_a_target_fixed_upstream_switches_the_fix_off(monkeypatch):
    """Target present without the defect: the fix is not needed, and no error."""
    from disttrain.keras_compat import detection, scalar_metric_reduction, symbolic_build_local_batch

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return self._symbolic_build(iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        return values

    monkeypatch.setattr(detection.trainer_class(), "_maybe_symbolic_build",
                        _maybe_symbolic_build)
    monkeypatch.setattr(detection.tf_trainer(), "reduce_per_replica", reduce_per_replica)
    assert not symbolic_build_local_batch.is_needed()
    assert not scalar_metric_reduction.is_needed()
    monkeypatch.delattr(detection.tf_trainer(), "reduce_per_replica")
    with pytest.raises(detection.TargetNotFound, match="reduce_per_replica is missing"):
        scalar_metric_reduction.is_needed()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_older_pair_passes_on_real_clusters(older_pair_venv):
    """`python -m tests.support.matrix` for the oldest supported Keras: its own venv (made
    once, kept in the temp dir; tests/conftest.py installs it in the background from the
    session's start), the quick real-cluster subset."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.matrix", "--pair", OLDER_PAIR, "--quick"], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{OLDER_PAIR}: ok" in result.stdout, result.stdout
