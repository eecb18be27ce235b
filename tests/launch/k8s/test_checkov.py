"""checkov, a policy scanner for Kubernetes manifests and Dockerfiles, passes what
`python -m launch.k8s` generates (every format, with and without every option, evaluator
included) and docker/Dockerfile, skipping only the rules `.checkov.yaml` names, each with its
reason on its line.

checkov's Kubernetes checks look into Jobs but not into JobSets, TFJobs or Trainer v2's
TrainingRuntimes (custom resources):
their pod templates are scanned as Jobs of their own beside them. checkov runs offline from an
environment of its own (pyproject.toml's `scan` extra explains why), made once under /var/tmp
(about 45 s); skipped, saying why, where it cannot be made.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from launch import k8s
from tests.launch.k8s.test_k8s import CONFIGS, _config, _pod_templates
from tests.support import REPO_ROOT

CONFIG_FILE = REPO_ROOT / ".checkov.yaml"


def _pin() -> str:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (pin,) = extras["scan"]
    return pin


def _checkov() -> Path:
    """The checkov executable of the pinned version, installed once into its own venv."""
    pin = _pin()
    venv = Path("/var/tmp", f"disttrain-{pin.replace('==', '-')}")
    executable = venv / "bin" / "checkov"
    if executable.exists():
        return executable
    made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)],
                          capture_output=True, text=True, timeout=120)
    if made.returncode == 0:
        made = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", pin],
                              capture_output=True, text=True, timeout=600)
    if made.returncode != 0:
        pytest.skip(f"cannot install {pin} into {venv}: {made.stderr.strip()[-500:]}")
    return executable


def _as_jobs(document: dict) -> list[dict]:
    """The pod templates of a JobSet, TFJob or Trainer v2 runtime as Jobs, so checkov's
    Kubernetes checks see them."""
    if document["kind"] not in ("JobSet", "TFJob", "TrainingRuntime"):
        return []
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {**document["metadata"], "name": f"{document['metadata']['name']}-{i}"},
             "spec": {"template": template}}
            for i, template in enumerate(_pod_templates([document]))]


def test_skipped_rules_each_have_a_reason():
    lines = [line for line in CONFIG_FILE.read_text().splitlines() if line.startswith("  - ")]
    assert lines, "no skip-check entries found"
    for line in lines:
        assert re.fullmatch(r"  - CKV2?_[A-Z0-9]+_\d+  # \S.{10,}", line), line
    skipped = yaml.safe_load(CONFIG_FILE.read_text())["skip-check"]
    assert len(skipped) == len(lines) == len(set(skipped))


@pytest.mark.timeout(900)
def test_generated_manifests_and_the_dockerfile_pass_checkov(tmp_path):
    checkov = _checkov()
    shutil.copy(REPO_ROOT / "docker" / "Dockerfile", tmp_path / "Dockerfile")
    jobs = set()
    for fmt in k8s.FORMATS:
        for which, base in CONFIGS.items():
            for evaluator in (False, True):
                documents = k8s.manifests(_config(base, format=fmt, evaluator=evaluator))
                documents += [job for document in documents for job in _as_jobs(document)]
                path = tmp_path / f"{fmt}-{which}-{evaluator}.yaml"
                path.write_text(k8s.to_yaml(documents))
                jobs |= {(f"/{path.name}", d["metadata"]["name"])
                         for d in documents if d["kind"] == "Job"}
    done = subprocess.run(
        [str(checkov), "--config-file", str(CONFIG_FILE), "--compact",
         "--skip-download", "--output", "json", "--framework", "kubernetes", "dockerfile",
         "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, done.stdout[-2000:]
    failed = [(f["check_id"], f["check_name"], f["resource"], f["file_path"])
              for report in reports for f in report["results"]["failed_checks"]]
    # With --service-account the token is mounted on purpose (Workload Identity needs it):
    # CKV_K8S_38 must fail there, and only there.
    token = {(check, path) for check, _, _, path in failed if check == "CKV_K8S_38"}
    assert token == {("CKV_K8S_38", path) for path, _ in jobs if "-full-" in path}, token
    assert [f for f in failed if f[0] != "CKV_K8S_38"] == [], failed
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0
    scanned = {(r["file_path"], r["resource"].rsplit(".", 1)[-1])
               for r in by_type["kubernetes"]["results"]["passed_checks"]
               if r["resource"].startswith("Job.")}
    assert scanned == jobs, "checkov did not look into every pod template"
