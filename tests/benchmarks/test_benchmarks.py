"""`python -m benchmarks --smoke` still runs end to end and prints its table.

A smoke run checks that the benchmark script works (every section, tiny sizes,
one round); its numbers mean nothing and nothing here asserts on timings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import docs_page
from disttrain.testing import worker_env
from tests.support import REPO_ROOT


@pytest.mark.slow
def test_smoke_run_prints_every_row_and_writes_the_docs_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(docs_page.PAGE.read_text())
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--scale",
                          "--write-docs", str(page)], check=False, cwd=REPO_ROOT,
                         env=worker_env(), capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-5000:]
    out = run.stdout
    assert out.startswith("disttrain benchmarks (smoke")
    assert "| what " in out and "| disttrain " in out and "| ratio " in out
    for row in ("train step, MLP 3x512", "vote, one call", "votes per epoch",
                "BatchNormalization statistics synced", "throughput, 2 worker(s)",
                "checkpoint commit on the chief", "bytes written per save by each non-chief",
                "digits demo, 2 workers", "launch.local, 2 workers: start to first training step",
                "launch.local: teardown after a worker fails", "compute alone: 2 processes",
                "+ gradient all-reduce", "fit with compile(steps_per_execution=8)",
                "on 10 MB of NumPy arrays, before training",
                "(launch.local default)", "one input iterator per fit",
                "fsync + atomic rename alone", "gradients all-reduced in bf16",
                "sparse gradients reduced and merged before apply",
                "bytes a worker sends per step for the embedding gradients",
                "the merge alone (unique + segment sum", "input order: draw one process's order",
                "BackupAndRestore save with per-worker parts",
                "disttrain BackupAndRestore async_commit=True: blocked",
                "BackupAndRestore every epoch, async_commit=True: time per step",
                "training step with the evaluator task running",
                "digits demo after 2 epochs, 2 workers: val_loss / accuracy with bf16", "scale, 2 workers: vote (coordination.any)",
                "scale, 2 workers: checkpoint decision", "scale, 2 workers: BatchNormalization sync",
                "scale, 2 workers: agreement per epoch"):
        assert row in out, f"missing row {row!r} in:\n{out}"
    assert "Scaling model:" in out and "Agreement model:" in out
    before, after = docs_page.PAGE.read_text(), page.read_text()
    head, tail = before.split(docs_page.BEGIN)[0], before.split(docs_page.END)[1]
    assert after.startswith(head + docs_page.BEGIN) and after.endswith(docs_page.END + tail)
    written = after[len(head):-len(tail)]
    assert "`python -m benchmarks --smoke --scale --write-docs" in written
    assert out.split("\n\n", 1)[1].split("\n\n")[0] in written, "the printed table"


def test_help_lists_the_sizes():
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], check=False,
                         cwd=REPO_ROOT,
                         env=worker_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--quick" in run.stdout and "--smoke" in run.stdout


def test_writing_docs_needs_the_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\nno markers here\n")
    with pytest.raises(ValueError, match="no .* section to replace. Fix: put the two markers"):
        docs_page.write("table", page)
    assert page.read_text() == "# Benchmarks\n\nno markers here\n"
