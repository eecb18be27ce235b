"""`disttrain.strategy(gradient_compression=...)`: the gradient all-reduce in 16 bits on a
real 2-worker cluster, the same weights on every worker, a loss close to float32's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from disttrain.testing import run_cluster, worker_env
from tests.keras_compat import compression_workloads
from tests.support import REPO_ROOT


@pytest.fixture(scope="module")
def uncompressed() -> dict:
    return run_cluster(compression_workloads.train, 1, kwargs={"compression": "none"},
                       timeout=180).assert_ok().results[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("compression,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_gradients_are_all_reduced_in_16_bits(uncompressed, compression, dtype):
    chief, worker = run_cluster(compression_workloads.train, 2,
                                kwargs={"compression": compression},
                                timeout=180).assert_ok().results
    assert chief == worker, "every worker applies the same reduced gradients"
    # The gradients' all-reduce is 16-bit; the step's scalar logs stay float32.
    assert chief["all_reduce_dtypes"] == sorted([dtype, "float32"])
    assert uncompressed["all_reduce_dtypes"] == []
    assert chief["weights"] != uncompressed["weights"]
    assert chief["loss"] == pytest.approx(uncompressed["loss"], rel=0.02)


def test_an_unknown_compression_is_refused_before_tensorflow_starts_a_cluster():
    proc = subprocess.run(
        [sys.executable, "-c", "import disttrain; disttrain.strategy(gradient_compression='int8')"],
        cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert ("StrategyError: gradient_compression='int8' is not supported. Fix: use one of "
            "'none', 'bf16', 'fp16'") in proc.stderr
