"""The TensorFlow × Keras matrix: each supported pair in its own venv, on real clusters.

For every pair of `PAIRS` (the one table of pinned versions) this creates a venv
under `--venvs` (kept and reused while its pins match), installs
`tensorflow-cpu` and Keras at those pins plus what the real-cluster subset needs
(no gcsfs: it upgrades protobuf past what older TensorFlows import), and runs
`SUBSET` from this checkout (found through `PYTHONPATH`, nothing installed from
it), then prints one row per pair: result, passed/failed counts, seconds.

Example:

```
python -m tests.support.matrix --venvs /tmp/disttrain-matrix                  # every pair
python -m tests.support.matrix --venvs /tmp/disttrain-matrix --pair tf2.19-keras3.10
python -m tests.support.matrix --pair tf2.19-keras3.10 --quick                 # what CI runs
python -m tests.support.matrix --install-only                                  # venvs only
```

Exit status: 0 when every selected pair passed, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support import REPO_ROOT



@dataclasses.dataclass(frozen=True)
class Pair:
    """One TensorFlow × Keras combination, pinned.

    Args:
        tensorflow: the `tensorflow-cpu` version.
        keras: the Keras version.
        keras_package: the distribution that provides `keras` (`keras-nightly`
            for nightlies, which replaces the `keras` TensorFlow pulls in).
        supported: False for a pair outside the supported range, which
            `disttrain.strategy()` must refuse with a `KerasCompatError`.
    """

    tensorflow: str
    keras: str
    keras_package: str = "keras"
    supported: bool = True

    @property
    def name(self) -> str:
        """A short name, e.g. `tf2.18-keras3.8` (`-nightly` for a nightly Keras)."""
        short = ".".join(self.keras.split(".")[:2])
        suffix = "-nightly" if self.keras_package != "keras" else ""
        return f"tf{'.'.join(self.tensorflow.split('.')[:2])}-keras{short}{suffix}"


PAIRS: tuple[Pair, ...] = (
    Pair("2.16.2", "3.15.1"),
    Pair("2.19.1", "3.10.0"),
    Pair("2.20.0", "3.11.3"),
    Pair("2.21.0", "3.15.1"),
    Pair("2.21.0", "3.16.0.dev2026102704", keras_package="keras-nightly"),
    Pair("2.22.0rc0", "3.16.0.dev2026102704", keras_package="keras-nightly"),
    Pair("2.18.1", "3.8.0", supported=False),
    Pair("2.16.2", "3.3.3", supported=False),
)
"""The supported pairs: the oldest TensorFlow, the oldest Keras (3.10, also the last
before Keras's change of the epoch iterator's steps), 3.11, the default, the
nightly, and TensorFlow 2.22.0rc0 with the keras-nightly it installs (23 of 23
passed, 302 s, 2026-12-07); then refused pairs (Keras 3.8's epoch metrics are not global under
multi-worker, Keras 3.3 lacks code the fixes patch)."""

TEST_REQUIREMENTS = ("portpicker==1.6.0", "fsspec==2026.9.0", "pyyaml==6.0.3", "pytest==9.2.0",
                     "pytest-timeout==2.4.0")
"""What `SUBSET` needs besides TensorFlow and Keras, pinned."""

SUBSET = ("tests/keras_compat/test_keras_compat.py", "tests/keras_compat/test_stop_agreement.py",
          "tests/keras_compat/test_versions.py::test_an_undeclared_keras_is_a_clear_error_before_training")
"""The real-cluster tests run for every pair."""

QUICK = ("tests/keras_compat/test_keras_compat.py::test_sequential_batchnorm_identical_on_every_worker[2]",
         "tests/keras_compat/test_keras_compat.py::test_steps_per_execution_matches_one_step_per_call[3]",
         "tests/keras_compat/test_keras_compat.py::"
         "test_persistent_epoch_iterator_trains_on_the_same_batches_as_new_iterators[3-False]",
         "tests/keras_compat/test_keras_compat.py::"
         "test_every_workers_save_to_one_path_leaves_a_whole_file",
         "tests/keras_compat/test_stop_agreement.py::test_a_stop_on_one_worker_at_epoch_end_stops_every_worker"
         "[2-1]",
         "tests/keras_compat/test_versions.py::test_an_undeclared_keras_is_a_clear_error_before_training")
"""With `--quick` (CI): one real-cluster test per fix and the stop agreement."""

_STAMP = "disttrain-matrix.json"
VENVS = Path(tempfile.gettempdir()) / "disttrain-matrix"
"""Where the venvs are kept unless `--venvs` says otherwise."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One pair's outcome: `ok` when pytest exited 0."""

    pair: Pair
    ok: bool
    passed: int
    failed: int
    seconds: float
    log: Path


def venv_path(venvs: Path, pair: Pair) -> Path:
    """Where `pair`'s venv lives under `venvs`."""
    return venvs / pair.name


def install(venvs: Path, pair: Pair) -> Path:
    """Creates `pair`'s venv unless one with the same pins is there; returns its python.

    pip's output goes to `<venvs>/<pair>.install.log`.

    Raises:
        subprocess.CalledProcessError: a `venv` or `pip` command failed.
    """
    venvs.mkdir(parents=True, exist_ok=True)
    venv = venv_path(venvs, pair)
    python = venv / "bin" / "python"
    stamp = venv / _STAMP
    pins = {"tensorflow": pair.tensorflow, "keras": pair.keras,
            "keras_package": pair.keras_package, "requirements": list(TEST_REQUIREMENTS)}
    if stamp.exists() and json.loads(stamp.read_text()) == pins:
        return python
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    keras = f"{pair.keras_package}=={pair.keras}"
    commands = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                [*pip, "install", f"tensorflow-cpu=={pair.tensorflow}", *TEST_REQUIREMENTS,
                 *([keras] if pair.keras_package == "keras" else [])]]
    if pair.keras_package != "keras":
        # TensorFlow depends on `keras`; both distributions own the `keras` package.
        commands += [[*pip, "uninstall", "-y", "keras"], [*pip, "install", keras]]
    with open(venvs / f"{pair.name}.install.log", "w") as log:
        for command in commands:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    stamp.write_text(json.dumps(pins))
    return python


def run(python: Path, pair: Pair, log: Path, tests: Sequence[str] = SUBSET) -> Result:
    """Runs `tests` of this checkout with `python` (for a refused pair: checks that
    `disttrain.strategy()` raises a `KerasCompatError` naming its Keras); the output
    goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("VIRTUAL_ENV", None)
    command = ([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
               if pair.supported else
               [str(python), "-c", "import disttrain; disttrain.strategy()"])
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    output = log.read_text()
    if not pair.supported:
        ok = code != 0 and f"KerasCompatError: disttrain is not tested with keras=={pair.keras}" \
            in output
        return Result(pair, ok, int(ok), int(not ok), seconds, log)
    summary = (output.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    return Result(pair, code == 0, counts.get("passed", 0), failed, seconds, log)


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (the one in README)."""
    rows = ["| tensorflow-cpu | keras | result | passed | failed | seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        keras = r.pair.keras if r.pair.keras_package == "keras" else (
            f"{r.pair.keras_package} {r.pair.keras}")
        outcome = ("pass" if r.pair.supported else "refused") if r.ok else "FAIL"
        rows.append(f"| {r.pair.tensorflow} | {keras} | {outcome} | "
                    f"{r.passed} | {r.failed} | {r.seconds:.0f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.matrix", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--venvs", type=Path, default=VENVS, help="where the venvs are kept (default: %(default)s)")
    parser.add_argument("--pair", action="append", choices=[p.name for p in PAIRS],
                        help="run only this pair (repeatable; default: every pair)")
    parser.add_argument("--quick", action="store_true",
                        help="run the QUICK subset instead of SUBSET (what CI runs)")
    parser.add_argument("--install-only", action="store_true",
                        help="create the venvs, run nothing")
    args = parser.parse_args(argv)
    pairs = [p for p in PAIRS if not args.pair or p.name in args.pair]
    args.venvs.mkdir(parents=True, exist_ok=True)
    results = []
    for pair in pairs:
        start = time.monotonic()
        python = install(args.venvs, pair)
        print(f"[matrix] {pair.name}: venv ready in {time.monotonic() - start:.0f}s", flush=True)
        if args.install_only:
            continue
        result = run(python, pair, args.venvs / f"{pair.name}.log",
                     QUICK if args.quick else SUBSET)
        print(f"[matrix] {pair.name}: {'ok' if result.ok else 'FAIL'} "
              f"({result.passed} passed, {result.failed} failed, {result.seconds:.0f}s); "
              f"log: {result.log}", flush=True)
        results.append(result)
    if results:
        print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
