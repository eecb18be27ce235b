"""What the launcher's console shows: TensorFlow's start-up noise hidden, one progress bar.

`REPRODUCED` is what every worker of `python -m launch.local --workers 4` (the demo,
TensorFlow 2.21 on a machine without a GPU driver) printed to stderr before this
filter: each of those lines must stay known-harmless.
"""

from __future__ import annotations

import re
import sys

import pytest

from disttrain.report import step_timing
from disttrain.testing import function_command, run_launcher
from launch import noise
from tests.launch import console_workloads

REPRODUCED = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796181008.417242   21722 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796181008.418448   21722 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1796181024.506168   21723 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""

OTHER_KNOWN = """\
I0000 00:00:1718000000.000000    1 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1718000000.000000    1 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one has already been registered
E0000 00:00:1718000000.000000    1 cuda_fft.cc:485] Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered
E0000 00:00:1718000000.000000    1 cuda_blas.cc:1418] Unable to register cuBLAS factory: Attempting to register factory for plugin cuBLAS when one has already been registered
W0000 00:00:1718000000.000000    1 computation_placer.cc:177] computation placer already registered. Please check linkage and avoid linking the same target more than once.
W0000 00:00:1718000000.000000    1 py_utils.cc:38] TF-TRT Warning: Could not find TensorRT
"""

MATTERS = """\
E0000 00:00:1796181024.506168   21723 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected
E0000 00:00:1796181024.506168   21723 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: CUDA_ERROR_UNKNOWN (999)
W0000 00:00:1796181024.506168   21723 local_rendezvous.cc:404] Local rendezvous is aborting with status: OUT_OF_RANGE: End of sequence
I0000 00:00:1796181008.418448   21722 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used. Out of memory.
Could not find cuda drivers on your machine, GPU will not be used.
Traceback (most recent call last):
RuntimeError: failed call to cuInit: UNKNOWN ERROR (303)
"""


@pytest.mark.parametrize("line", (REPRODUCED + OTHER_KNOWN).splitlines())
def test_known_harmless_lines_are_recognised(line):
    assert noise.is_known_harmless(line)


@pytest.mark.parametrize("line", MATTERS.splitlines())
def test_lines_that_may_matter_are_not(line):
    assert not noise.is_known_harmless(line)


def _noise_script(tmp_path) -> list[str]:
    script = tmp_path / "noisy.py"
    script.write_text(
        "import sys\n"
        f"sys.stderr.write({REPRODUCED!r})\n"
        "print('a line of the user', file=sys.stderr)\n")
    return [sys.executable, str(script)]


@pytest.mark.parametrize("show_all", [False, True])
def test_launcher_hides_known_lines_unless_show_all_and_logs_keep_them(tmp_path, show_all):
    logs = tmp_path / "logs"
    job = run_launcher(["--workers", "2", "--log-dir", str(logs),
                        *(["--show-all"] if show_all else []), "--", *_noise_script(tmp_path)],
                       timeout=60)
    assert job.returncode == 0 and not job.survivors, job.report()
    for label in ("w0", "w1"):
        assert f"[{label}] a line of the user\n" in job.stderr
        assert (logs / "attempt-0" / f"{label}.stderr.log").read_text().startswith(REPRODUCED)
        for line in REPRODUCED.splitlines():
            assert (f"[{label}] {line}\n" in job.stderr) is show_all, job.stderr
    hidden = "[launch]   8 known-harmless TensorFlow start-up line(s) hidden (all in --log-dir)"
    assert (hidden in job.stderr) is not show_all, job.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_workers_one_progress_bar_no_start_up_noise_failure_tail(tmp_path):
    """Every worker calls fit(verbose=1); TF_CPP_MIN_LOG_LEVEL as the launcher sets it. A
    checkpoint without a tracked best: the summary names the last one and says so."""
    logs = tmp_path / "logs"
    job = run_launcher(
        ["--workers", "2", "--log-dir", str(logs), "--",
         *function_command(console_workloads.fit_verbose_everywhere,
                           {"checkpoints": str(tmp_path / "ckpt"), "fail_rank": 1,
                            "straggler_rank": 1})],
        timeout=240, env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert job.returncode == 1 and not job.survivors, job.report()
    assert re.search(r"^\[w0\] Epoch 3/3$", job.stdout, re.MULTILINE), job.report()
    assert "[w1]" not in job.stdout, "Keras's progress bar shows on the chief only"
    assert "Epoch 1/3" in (logs / "attempt-0" / "w0.stdout.log").read_text()
    assert f"[w1] {console_workloads.UNKNOWN_STDERR_LINE}\n" in job.stderr
    shown = [line.split("] ", 1)[1] for line in job.stderr.splitlines()
             if re.match(r"\[w\d\] ", line)]
    assert not [line for line in shown if noise.is_known_harmless(line)], job.stderr
    raw = (logs / "attempt-0" / "w1.stderr.log").read_text().splitlines()
    assert any(noise.is_known_harmless(line) for line in raw), "the log keeps them"
    tail = job.stderr.split("w1 failed first", 1)[1]
    assert f"  | RuntimeError: {console_workloads.FAILURE}" in tail, job.stderr
    last = tmp_path / "ckpt" / "m-3.keras"
    assert f"[launch]   last_checkpoint  {last}\n" in job.stderr, "no best, no 'value null'"
    assert "no best tracked: 'val_loss' was never logged" in job.stderr
    assert "best_checkpoint" not in job.stderr and "null" not in job.stderr
    timing = {label: step_timing.read(str(logs / f"timing-{label}.json"))
              for label in ("w0", "w1")}
    assert [e["epoch"] for e in timing["w1"]] == [1, 2, 3] and timing["w0"][0]["steps"] == 8
    assert timing["w1"][0]["outside_s"] >= console_workloads.STRAGGLER_SLEEP_S
    for label in ("w0", "w1"):
        assert re.search(rf"^\[launch\]   {label} +[\d.]+ms +[\d.]+ms +\d \([\d.]+s\)$",
                         job.stderr, re.MULTILINE), job.stderr
    assert "[launch]   straggler: w1 spends" in job.stderr, job.stderr


def _epochs(outside: list[float], step: float = 0.02) -> list[dict]:
    return [{"epoch": i + 1, "seconds": 1.0 + i, "steps": 10, "step_s": step, "outside_s": o}
            for i, o in enumerate(outside)]


def test_a_straggler_is_named_only_when_persistently_slower():
    slow = {"w0": _epochs([0.001] * 4), "w1": _epochs([0.03] * 4), "w2": _epochs([0.002] * 4)}
    assert step_timing.stragglers(slow) == "w1"
    lines = step_timing.summary_lines(slow)
    assert lines[1] == "  w0         20.0ms    1.0ms     4 (4.0s)"
    assert lines[-1].startswith("  straggler: w1 spends 30.0ms per step between steps (the "
                                "others at most 2.0ms)")
    once = {"w0": _epochs([0.001, 0.001, 0.001, 0.04]), "w1": _epochs([0.03, 0.03, 0.0005, 0.001])}
    assert step_timing.stragglers(once) is None, "slowest in half the epochs is not persistent"
    close = {"w0": _epochs([0.001] * 4), "w1": _epochs([0.003] * 4)}
    assert step_timing.stragglers(close) is None, "2 ms more is below the threshold"
    assert step_timing.stragglers({"w0": _epochs([0.001]), "w1": []}) is None
    assert step_timing.summary_lines({"w0": [], "w1": []}) == []
