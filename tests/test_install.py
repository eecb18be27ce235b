"""disttrain installs beside any TensorFlow, and without one.

TensorFlow and gcsfs are extras (see pyproject.toml), so a plain `pip install`
of this package into a fresh venv (no system site-packages) brings its core
dependencies only. There `pip check` is clean, `import disttrain`, the cluster
parser, storage and the launcher work, and what needs TensorFlow
(`disttrain.strategy()`, `disttrain.callbacks`) or gcsfs (`gs://`) fails with the
install command in the message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

PACKAGE_FILES = ("pyproject.toml", "README.md", "disttrain", "launch")
EXTRAS_ONLY = {"tensorflow", "tensorflow-cpu", "keras", "gcsfs", "protobuf", "numpy"}

BLOCK_HEAVY = """
import sys
sys.modules.update(dict.fromkeys(("tensorflow", "keras", "gcsfs")))  # as if not installed
"""
PROBE = """
import json, sys
import disttrain, disttrain.cluster, disttrain.storage, launch.local
heavy = ("tensorflow", "keras", "gcsfs")
found = {"heavy_imported": [name for name in heavy if sys.modules.get(name) is not None]}
for name, use in (
    ("strategy", lambda: disttrain.strategy()),
    ("callbacks", lambda: disttrain.callbacks.ModelCheckpoint),
):
    try:
        use()
        found[name] = "no error"
    except disttrain.MissingDependencyError as e:
        found[name] = str(e)
try:
    disttrain.storage.url_to_fs("gs://bucket/ckpt")
    found["gs"] = "no error"
except disttrain.StorageError as e:
    found["gs"] = str(e)
print(json.dumps(found))
"""


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_each_use_names_its_install(python: str | Path, prelude: str, cwd: Path) -> None:
    probe = _run(python, "-c", prelude + PROBE, cwd=cwd)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["heavy_imported"] == []
    for use in ("strategy", "callbacks"):
        assert "tensorflow and keras are not installed" in found[use], found[use]
        assert 'pip install "disttrain[cpu]"' in found[use], found[use]
    assert "disttrain.strategy()" in found["strategy"]
    assert "pip install gcsfs" in found["gs"], found["gs"]


def test_without_tensorflow_each_use_names_its_install(tmp_path: Path):
    """The quick check, in this environment with the heavy packages made unimportable."""
    _assert_each_use_names_its_install(sys.executable, BLOCK_HEAVY, cwd=tmp_path)


@pytest.mark.slow
def test_plain_install_has_no_tensorflow_and_says_how_to_get_it(tmp_path: Path):
    # A copy of what the package is built from: building in the checkout would write there.
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    created = _run(sys.executable, "-m", "venv", tmp_path / "venv", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    python = tmp_path / "venv" / "bin" / "python"

    installed = _run(python, "-m", "pip", "install", "--quiet", source, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    check = _run(python, "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = _run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "disttrain" in names and not names & EXTRAS_ONLY, sorted(names)

    _assert_each_use_names_its_install(python, "", cwd=tmp_path)
    launcher = _run(python, "-m", "launch.local", "--help", cwd=tmp_path)
    assert launcher.returncode == 0 and "--workers" in launcher.stdout, launcher.stderr
