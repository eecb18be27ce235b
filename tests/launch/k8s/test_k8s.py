"""Tests of `python -m launch.k8s`: manifests valid against the official Kubernetes schemas
(offline, strict), consistent with each other and with the entrypoint, readable YAML, clear
errors, and k8s/ in sync with the generator.

kubernetes-validate ships the Kubernetes OpenAPI schemas but no JobSet or TFJob CRD, so for
those the embedded Job / pod template is validated against the official schema and the CRD's
own fields are checked here against the JobSet v1alpha2 and TFJob v1 API types.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from disttrain.errors import PREEMPTED_EXIT_CODE
from launch import entrypoint, k8s
from tests.support import REPO_ROOT

# successPolicy on a Job needs the 1.30 schema; 1.37 is the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")
DEMO = ("python", "-m", "disttrain.demo", "--epochs", "20",
        "--output-dir", "$(DISTTRAIN_CHECKPOINT_URL)")
MINIMAL = k8s.JobConfig(name="mnist", workers=4, image="registry.example/disttrain:0.1.0",
                        command=DEMO, checkpoint_url="gs://bucket/mnist")
FULL = k8s.JobConfig(
    name="mnist", workers=16, image="registry.example/disttrain:0.1.0", command=DEMO,
    namespace="ml", cpu="3500m", memory="12Gi", gpus=2, port=3333,
    checkpoint_url="gs://bucket/mnist", service_account="trainer", gcp_key_secret="gcp-key",
    env=(("TF_CPP_MIN_LOG_LEVEL", "2"), ("FLAG", "yes")), run_id="mnist-2026.1",
    max_restarts=5, peer_timeout=120, termination_grace=300,
)
CONFIGS = {"minimal": MINIMAL, "full": FULL}
# Where each format's pods read their run id when no --run-id is given: a pod label holding the
# UID of the object that owns the job instance (Kubernetes well-known labels; JobSet v1alpha2
# `JobSetUIDKey`; Trainer v2 makes one JobSet per TrainJob). TFJob pods have none.
RUN_ID_FIELDS = {"job": "metadata.labels['batch.kubernetes.io/controller-uid']",
                 "jobset": "metadata.labels['jobset.sigs.k8s.io/jobset-uid']",
                 "trainjob": "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"}

# Allowed values the OpenAPI schemas only state in prose (kubernetes-validate does not check
# them): batch/v1 and core/v1 API reference.
ENUMS = {
    "completionMode": {"NonIndexed", "Indexed"},
    "podReplacementPolicy": {"TerminatingOrFailed", "Failed"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "action": {"FailJob", "FailIndex", "Ignore", "Count"},
    "operator": {"In", "NotIn"},
    "status": {"True", "False", "Unknown"},
    "protocol": {"TCP", "UDP", "SCTP"},
}


def _config(base: k8s.JobConfig, **changes: Any) -> k8s.JobConfig:
    return k8s.JobConfig(**{**base.__dict__, **changes})


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def _env(container: dict) -> dict[str, Any]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _expected_run_id(config: k8s.JobConfig) -> Any:
    if config.fixed_run_id is not None:
        return config.fixed_run_id
    return {"fieldRef": {"fieldPath": RUN_ID_FIELDS[config.format]}}


def _check_pod_spec(pod_spec: dict, config: k8s.JobConfig) -> None:
    """What the API server (not the schema) would reject, and what the entrypoint needs."""
    container = _container(pod_spec)
    env = _env(container)
    assert container["command"][:3] == ["python", "-m", "launch.entrypoint"]
    assert container["command"][-1] == "--"
    assert (REPO_ROOT / "launch" / "entrypoint.py").is_file()
    assert container["args"] == list(config.command)
    for reference in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert reference in env, f"$({reference}) would not be expanded by Kubernetes"
    assert env["DISTTRAIN_RUN_ID"] == _expected_run_id(config)
    for name, value in config.env:
        assert env[name] == value
    (port,) = container["ports"]
    assert port["containerPort"] == config.port and port["protocol"] in ENUMS["protocol"]
    assert len(port["name"]) <= 15
    resources = container["resources"]
    assert resources["requests"] == {"cpu": config.cpu, "memory": config.memory}
    assert resources["limits"].get("nvidia.com/gpu") == (config.gpus or None)
    if config.checkpoint_url:
        assert env["DISTTRAIN_CHECKPOINT_URL"] == config.checkpoint_url
    assert pod_spec.get("serviceAccountName") == config.service_account
    _check_restricted(pod_spec, config)
    secrets = [v for v in pod_spec["volumes"] if "secret" in v]
    if config.gcp_key_secret:
        (volume,) = secrets
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert volume["secret"]["secretName"] == config.gcp_key_secret
        assert mount["readOnly"] is True
        key_path = f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == key_path
    else:
        assert not secrets and "GOOGLE_APPLICATION_CREDENTIALS" not in env


# The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/
# pod-security-standards, v1.30+), as far as a pod spec can break it: the volume types it
# allows, and the fields below.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}


def _check_restricted(pod_spec: dict, config: k8s.JobConfig) -> None:
    """The pod meets the restricted Pod Security Standard, mounts a service-account token only
    with --service-account, and has writable scratch space where the root FS is read-only."""
    assert not {"hostNetwork", "hostPID", "hostIPC", "hostUsers"} & set(pod_spec)
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for volume in pod_spec["volumes"]:
        (kind,) = set(volume) - {"name"}
        assert kind in RESTRICTED_VOLUME_TYPES, volume
    expected_token = False if config.service_account is None else None
    assert pod_spec.get("automountServiceAccountToken") is expected_token
    for container in pod_spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert security.get("runAsNonRoot", True) is True and not security.get("privileged")
        assert "seccompProfile" not in security or security["seccompProfile"]["type"] in (
            "RuntimeDefault", "Localhost")
        assert not any("hostPort" in port for port in container["ports"])
        scratch = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        empty_dirs = {v["name"] for v in pod_spec["volumes"] if "emptyDir" in v}
        home = _env(container)["HOME"]
        assert scratch["/tmp"] in empty_dirs and scratch[home] in empty_dirs


def _check_indexed_job_spec(spec: dict, config: k8s.JobConfig, backoff_limit: int) -> None:
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == config.workers
    assert spec["backoffLimit"] == backoff_limit
    assert spec["podReplacementPolicy"] in ENUMS["podReplacementPolicy"]
    # With a podFailurePolicy the API server only accepts Failed, and restartPolicy Never.
    assert spec["podReplacementPolicy"] == "Failed"
    pod_spec = spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    container_names = {c["name"] for c in pod_spec["containers"]}
    actions = []
    for rule in spec["podFailurePolicy"]["rules"]:
        assert rule["action"] in ENUMS["action"]
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule)
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] in ENUMS["operator"]
            assert codes["containerName"] in container_names
            assert 0 not in codes["values"]
            actions.append((rule["action"], codes["values"]))
        for condition in rule.get("onPodConditions", []):
            assert condition["status"] in ENUMS["status"]
            actions.append((rule["action"], condition["type"]))
    assert actions == [("FailJob", [entrypoint.EXIT_CONFIG_ERROR]),
                       ("Ignore", [PREEMPTED_EXIT_CODE]), ("Ignore", "DisruptionTarget")], (
        "a configuration error fails the job; a preemption (the evicted pod's DisruptionTarget, "
        "its peers' exit 75 after the agreed backup) does not count against backoffLimit")
    assert pod_spec["terminationGracePeriodSeconds"] == config.termination_grace
    (rule,) = spec["successPolicy"]["rules"]
    assert rule == {"succeededIndexes": "0"}
    _check_pod_spec(pod_spec, config)


def _pod_hostnames(config: k8s.JobConfig, env: dict[str, Any]) -> list[str]:
    """Pod names the entrypoint derives from the env, the way it derives them."""
    return [f"{env['DISTTRAIN_JOB_NAME']}-{i}" for i in range(int(env["DISTTRAIN_NUM_WORKERS"]))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", CONFIGS)
def test_job_and_service_validate_strictly_and_agree(which, version):
    config = CONFIGS[which]
    policy, service, job = k8s.manifests(config)
    for document in (policy, service, job):
        assert kubernetes_validate.validate(document, version, strict=True) == version

    assert (service["kind"], job["kind"]) == ("Service", "Job")
    assert service["metadata"]["name"] == job["metadata"]["name"] == config.name
    assert service["metadata"].get("namespace") == job["metadata"].get("namespace") \
        == config.namespace
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == config.port
    _check_indexed_job_spec(job["spec"], config, config.max_restarts * config.workers)

    pod_spec = job["spec"]["template"]["spec"]
    env = _env(_container(pod_spec))
    assert pod_spec["subdomain"] == env["DISTTRAIN_SERVICE"] == service["metadata"]["name"]
    assert env["DISTTRAIN_JOB_NAME"] == job["metadata"]["name"]
    assert env["DISTTRAIN_NUM_WORKERS"] == str(config.workers)
    assert env["DISTTRAIN_PORT"] == str(config.port)
    assert env["DISTTRAIN_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # An Indexed Job names pod i's host "<job>-<i>"; that name must fit in a DNS label.
    hostnames = _pod_hostnames(config, env)
    assert hostnames == [config.hostname(i) for i in range(config.workers)]
    assert all(len(h) <= 63 for h in hostnames)


def _jobset_spec(document: dict) -> dict:
    """The JobSet spec of a JobSet, or of the JobSet template of a Trainer v2 runtime."""
    if document["kind"] == "TrainingRuntime":
        return document["spec"]["template"]["spec"]
    return document["spec"]


def _pod_templates(documents: list[dict]) -> list[dict]:
    """Every pod template of a manifest (workers and evaluator), in any format."""
    templates = []
    for document in documents:
        if document["kind"] == "Job":
            templates.append(document["spec"]["template"])
        elif document["kind"] in ("JobSet", "TrainingRuntime"):
            templates += [job["template"]["spec"]["template"]
                          for job in _jobset_spec(document)["replicatedJobs"]]
        elif document["kind"] == "TFJob":
            templates += [replica["template"]
                          for replica in document["spec"]["tfReplicaSpecs"].values()]
    return templates


@pytest.mark.timeout(60)
@pytest.mark.parametrize("evaluator", [False, True])
@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_network_policy_admits_only_the_jobs_own_pods_to_the_grpc_port(fmt, evaluator):
    """TensorFlow's gRPC server is unauthenticated: a NetworkPolicy comes first in every format,
    selects every pod of the job (evaluator included) and admits only them, only to the port."""
    for which, base in CONFIGS.items():
        config = _config(base, format=fmt, evaluator=evaluator)
        documents = k8s.manifests(config)
        policy = documents[0]
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)
        assert (policy["kind"], policy["metadata"].get("namespace")) == (
            "NetworkPolicy", config.namespace)
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"], "egress stays open: storage, DNS"
        (rule,) = spec["ingress"]
        assert rule["from"] == [{"podSelector": spec["podSelector"]}]
        assert rule["ports"] == [{"protocol": "TCP", "port": config.port}]
        selector = spec["podSelector"]["matchLabels"]
        templates = _pod_templates(documents)
        assert len(templates) == 1 + evaluator, which
        for template in templates:
            assert selector.items() <= template["metadata"]["labels"].items(), which
            (port,) = _container(template["spec"])["ports"]
            assert port["containerPort"] == config.port
        other = _config(config, name=f"{config.name}-other")
        assert k8s.manifests(other)[0]["spec"]["podSelector"]["matchLabels"] != selector, (
            "another job's pods are not admitted")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_every_pod_meets_the_restricted_pod_security_standard(fmt):
    for config in (_config(MINIMAL, format=fmt, evaluator=True),
                   _config(FULL, format=fmt, evaluator=True)):
        for template in _pod_templates(k8s.manifests(config)):
            _check_restricted(template["spec"], config)


# JobSet v1alpha2 fields and enums (jobset.x-k8s.io API types) used or constrained here.
JOBSET_SPEC_FIELDS = {"replicatedJobs", "network", "successPolicy", "failurePolicy",
                      "startupPolicy", "suspend", "coordinator", "managedBy",
                      "ttlSecondsAfterFinished", "volumeClaimPolicies"}
JOBSET_FAILURE_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
                          "RestartJob", "RestartJobAndIgnoreMaxRestarts"}
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy",
                       "MaxFailedIndexesExceeded", "FailedIndexes"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", CONFIGS)
def test_jobset_embeds_a_valid_indexed_job(which):
    config = _config(CONFIGS[which], format="jobset")
    _, jobset = k8s.manifests(config)
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    spec = jobset["spec"]
    assert set(spec) <= JOBSET_SPEC_FIELDS
    assert spec["network"] == {"enableDNSHostnames": True, "subdomain": config.name,
                               "publishNotReadyAddresses": True}
    (replicated,) = spec["replicatedJobs"]
    assert set(replicated) == {"name", "replicas", "template"} and replicated["replicas"] == 1
    assert spec["successPolicy"]["operator"] in {"All", "Any"}
    assert spec["successPolicy"]["targetReplicatedJobs"] == [replicated["name"]]
    assert spec["failurePolicy"]["maxRestarts"] == config.max_restarts
    for rule in spec["failurePolicy"]["rules"]:
        assert set(rule) <= {"name", "action", "onJobFailureReasons",
                             "onJobFailureMessagePatterns", "targetReplicatedJobs"}
        assert rule["action"] in JOBSET_FAILURE_ACTIONS
        assert set(rule["onJobFailureReasons"]) <= JOB_FAILURE_REASONS

    template = replicated["template"]
    as_job = {"apiVersion": "batch/v1", "kind": "Job",
              "metadata": {"name": f"{config.name}-{replicated['name']}-0", **template["metadata"]},
              "spec": template["spec"]}
    kubernetes_validate.validate(as_job, K8S_VERSIONS[-1], strict=True)
    # JobSet restarts the whole group, so a failed pod fails its Job at once.
    _check_indexed_job_spec(template["spec"], config, 0)
    pod_spec = template["spec"]["template"]["spec"]
    assert "subdomain" not in pod_spec, "JobSet sets the subdomain itself"
    env = _env(_container(pod_spec))
    # JobSet names the Job "<jobset>-<replicatedJob>-<jobIndex>" and pod i's host "<job>-<i>".
    assert env["DISTTRAIN_JOB_NAME"] == as_job["metadata"]["name"]
    assert env["DISTTRAIN_SERVICE"] == spec["network"]["subdomain"]
    hostnames = _pod_hostnames(config, env)
    assert hostnames == [config.hostname(i) for i in range(config.workers)]
    assert all(len(h) <= 63 for h in hostnames)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", CONFIGS)
def test_tfjob_embeds_a_valid_pod_template(which):
    config = _config(CONFIGS[which], format="tfjob")
    _, tfjob = k8s.manifests(config)
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    spec = tfjob["spec"]
    assert set(spec) <= {"runPolicy", "tfReplicaSpecs", "successPolicy", "enableDynamicWorker"}
    assert set(spec["runPolicy"]) <= {"backoffLimit", "cleanPodPolicy", "activeDeadlineSeconds",
                                      "ttlSecondsAfterFinished", "schedulingPolicy", "suspend",
                                      "managedBy"}
    assert spec["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    assert spec["runPolicy"]["backoffLimit"] == config.max_restarts * config.workers
    assert set(spec["tfReplicaSpecs"]) == {"Worker"}, "no Chief: worker 0 is the chief"
    worker = spec["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == config.workers
    assert worker["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}

    as_pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": config.name}, "template": worker["template"]}
    kubernetes_validate.validate(as_pod_template, K8S_VERSIONS[-1], strict=True)
    pod_spec = worker["template"]["spec"]
    _check_pod_spec(pod_spec, config)
    container = _container(pod_spec)
    # The operator injects TF_CONFIG into the container named "tensorflow", using the port
    # named "tfjob-port"; the entrypoint then uses that TF_CONFIG as is.
    assert container["name"] == "tensorflow"
    assert container["ports"][0]["name"] == "tfjob-port"
    assert not {"TF_CONFIG", "DISTTRAIN_JOB_NAME"} & set(_env(container))


@pytest.mark.parametrize("fmt", ["job", "jobset"])
def test_run_id_is_the_uid_of_the_job_instance_unless_given(fmt):
    """Deleting a Job (JobSet) and applying it again under the same name creates a new object
    with a new UID, hence a new run; pods restarted or replaced within one object keep its UID,
    so BackupAndRestore resumes. The run id is not the name."""
    config = _config(MINIMAL, format=fmt)
    documents = k8s.manifests(config)
    pod_template = _pod_spec_of(documents[-1])
    env = _env(_container(pod_template["spec"]))
    assert env["DISTTRAIN_RUN_ID"] == {"fieldRef": {"fieldPath": RUN_ID_FIELDS[fmt]}}
    assert k8s.manifests(config) == documents, "the manifest itself is reproducible"
    for document in documents:
        assert "disttrain/run-id" not in document["metadata"]["labels"]
    assert "disttrain/run-id" not in pod_template["metadata"]["labels"]

    given = _config(config, run_id="mnist-7")
    documents = k8s.manifests(given)
    pod_template = _pod_spec_of(documents[-1])
    assert _env(_container(pod_template["spec"]))["DISTTRAIN_RUN_ID"] == "mnist-7"
    assert pod_template["metadata"]["labels"]["disttrain/run-id"] == "mnist-7"


def test_tfjob_gets_a_run_id_per_generated_manifest_unless_given():
    """TFJob pods carry no per-instance identifier: each generated manifest has its own id."""
    first, second = (_config(MINIMAL, format="tfjob", tfjob_run_id=k8s.new_run_id())
                     for _ in range(2))
    ids = []
    for config in (first, second):
        _, tfjob = k8s.manifests(config)
        template = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]
        run_id = _env(_container(template["spec"]))["DISTTRAIN_RUN_ID"]
        assert isinstance(run_id, str) and run_id != config.name
        assert template["metadata"]["labels"]["disttrain/run-id"] == run_id
        ids.append(run_id)
    assert ids[0] != ids[1]
    assert k8s.JobConfig(name="a", workers=1, image="i", command=("x",)).tfjob_run_id != \
        k8s.JobConfig(name="a", workers=1, image="i", command=("x",)).tfjob_run_id
    _, tfjob = k8s.manifests(_config(first, run_id="mnist-7"))
    template = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]
    assert _env(_container(template["spec"]))["DISTTRAIN_RUN_ID"] == "mnist-7"


def _pod_spec_of(workload: dict) -> dict:
    """The pod template of a Job, JobSet or TFJob."""
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    if workload["kind"] == "TFJob":
        return workload["spec"]["tfReplicaSpecs"]["Worker"]["template"]
    return workload["spec"]["template"]


@pytest.mark.timeout(60)
def test_cli_run_ids_job_per_instance_tfjob_per_generation(tmp_path):
    cli = [sys.executable, "-m", "launch.k8s", "--name", "mnist", "--workers", "2",
           "--image", "img:1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def generate(*args: str) -> tuple[Any, str]:
        done = subprocess.run([*cli, *args, "--", "python", "train.py"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        workload = list(yaml.safe_load_all(done.stdout))[-1]
        return _env(_container(_pod_spec_of(workload)["spec"]))["DISTTRAIN_RUN_ID"], done.stderr

    assert generate() == ({"fieldRef": {"fieldPath": RUN_ID_FIELDS["job"]}}, "")
    (first, note), (second, _) = generate("--format", "tfjob"), generate("--format", "tfjob")
    assert first != second
    assert f"this manifest has a run id of its own, {first}: applying it again" in note
    assert generate("--format", "tfjob", "--run-id", "mnist-7") == ("mnist-7", "")


@pytest.mark.timeout(60)
def test_help_and_readme_document_run_ids_and_the_tfjob_restart_policy():
    out = subprocess.run([sys.executable, "-m", "launch.k8s", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "trainjob (Kubeflow Trainer v2)" in out.stdout
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    for text in (out.stdout, " ".join(readme.split())):
        for label in ("batch.kubernetes.io/controller-uid", "jobset.sigs.k8s.io/jobset-uid"):
            assert label in text
        assert "JobSet v0.9.0" in text and "Kubernetes 1.27" in text
        assert "keeping it unique is" in text
        assert "ExitCode" in text and "1-127" in text and "OnFailure" in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_evaluator_is_one_more_valid_pod_that_never_fails_the_training(fmt):
    """The evaluator runs the same command with the same run id and checkpoint URL, as the
    evaluator task of the workers' cluster; its pod restarts in place and its Job never fails
    (EVALUATOR_NOTE)."""
    config = _config(MINIMAL, format=fmt, evaluator=True)
    documents = k8s.manifests(config)
    if fmt == "tfjob":
        _, tfjob = documents
        replicas = tfjob["spec"]["tfReplicaSpecs"]
        assert set(replicas) == {"Worker", "Evaluator"}
        assert (replicas["Evaluator"]["replicas"], replicas["Evaluator"]["restartPolicy"]) == (
            1, "OnFailure")
        assert tfjob["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
        template = replicas["Evaluator"]["template"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": config.name}, "template": template},
                                     K8S_VERSIONS[-1], strict=True)
        _check_pod_spec(template["spec"], config)
        assert _env(_container(template["spec"]))["DISTTRAIN_RUN_ID"] == _env(_container(
            replicas["Worker"]["template"]["spec"]))["DISTTRAIN_RUN_ID"] == config.tfjob_run_id
        return
    if fmt == "job":
        _, service, job, evaluator = documents
        assert evaluator["metadata"]["name"] == f"{config.name}-evaluator"
        for document in documents:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)
        workers, spec = job["spec"], evaluator["spec"]
        assert service["spec"]["selector"].items() <= spec["template"]["metadata"][
            "labels"].items(), "harmless: the evaluator never listens"
    else:
        jobset = _jobset_spec(documents[1])
        worker_job, evaluator = jobset["replicatedJobs"]
        assert evaluator["name"] == "evaluator" and evaluator["replicas"] == 1
        assert jobset["successPolicy"] == {"operator": "All", "targetReplicatedJobs": [
            worker_job["name"], "evaluator"]}, "not deleted before it evaluated the last checkpoint"
        assert "trainer.kubeflow.org/trainjob-ancestor-step" not in evaluator["template"][
            "metadata"]["labels"], "Trainer v2's numNodes applies to the workers only"
        workers, spec = worker_job["template"]["spec"], evaluator["template"]["spec"]
        kubernetes_validate.validate(
            {"apiVersion": "batch/v1", "kind": "Job", "spec": spec,
             "metadata": {"name": f"{config.name}-evaluator-0", **evaluator["template"][
                 "metadata"]}}, K8S_VERSIONS[-1], strict=True)
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 1, 1)
    assert spec["backoffLimit"] == 2**31 - 1 and "podFailurePolicy" not in spec
    pod_spec = spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "OnFailure" and "subdomain" not in pod_spec
    _check_pod_spec(pod_spec, config)
    env, worker_env = (_env(_container(s["template"]["spec"])) for s in (spec, workers))
    assert env["DISTTRAIN_RUN_ID"] == worker_env["DISTTRAIN_RUN_ID"]
    assert env.pop("DISTTRAIN_TASK_TYPE") == "evaluator" and "DISTTRAIN_TASK_TYPE" not in worker_env
    assert env == worker_env
    pod = {k: v for k, v in env.items() if isinstance(v, str)}
    worker_view = entrypoint.tf_config_from_env(
        {**pod, "JOB_COMPLETION_INDEX": "0", "HOSTNAME": config.hostname(0)})
    evaluator_view = entrypoint.tf_config_from_env(
        {**pod, "DISTTRAIN_TASK_TYPE": "evaluator", "JOB_COMPLETION_INDEX": "0",
         "HOSTNAME": config.evaluator_hostname})
    assert evaluator_view == {"cluster": worker_view["cluster"],
                              "task": {"type": "evaluator", "index": 0}}
    suffix = len(config.evaluator_hostname) - len(config.name)
    with pytest.raises(k8s.ManifestConfigError, match="the evaluator's hostname"):
        k8s.manifests(_config(config, name="m" * (64 - suffix)))


def test_tfjob_keeps_on_failure_because_exit_code_makes_exit_1_permanent():
    """TFJob v1's `ExitCode` treats 1-127 as permanent: exit 2 would stop at once, but so would
    exit 1, the exit of every surviving MWMS worker when a peer is lost. OnFailure is kept and
    the limitation documented (test above)."""
    _, tfjob = k8s.manifests(_config(MINIMAL, format="tfjob"))
    assert tfjob["spec"]["tfReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    assert "ExitCode" in k8s.TFJOB_RESTART_POLICY_NOTE


YAMLLINT = yamllint_config.YamlLintConfig("extends: default")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", CONFIGS)
@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_yaml_round_trips_and_lints_clean(fmt, which):
    documents = k8s.manifests(_config(CONFIGS[which], format=fmt))
    text = k8s.to_yaml(documents)
    assert list(yaml.safe_load_all(text)) == documents
    assert [str(p) for p in linter.run(text, YAMLLINT)] == []


def test_yaml_folds_long_single_words_so_lines_stay_lint_clean():
    long = "registry.example.com/" + "team/" * 12 + "disttrain:0.1.0"
    document = {"deep": {"deeper": {"image": long, "hash": "#" + "x" * 80,
                                    "quoted": "'q':" * 20, "args": [long, "-" + long]}},
                "short": "metadata.labels['a']"}
    text = k8s.to_yaml([document])
    assert yaml.safe_load(text) == document
    assert [str(p) for p in linter.run(text, YAMLLINT)] == [], text
    assert "short: \"metadata.labels['a']\"\n" in text, "short values stay on their line"
    assert f"    image: >-\n      {long}\n" in text


def test_yaml_quotes_exactly_the_strings_that_need_it():
    tricky = ["yes", "No", "on", "true", "null", "~", "2222", "1e3", "0x1F", ".5", "-1", "--",
              "-m", "a: b", "a:", "#x", "x #y", "", " lead", "trail ", "multi\nline", "tab\t",
              "quote\"s", "back\\slash", "ünïcode", "$(DISTTRAIN_CHECKPOINT_URL)",
              "gs://bucket/run", "@at", "*star", "&amp", "!tag", "%pct", "[list]", "{map}",
              "'single'", "a,b", "python", "nvidia.com/gpu"]
    document = {"keys": {value or "empty": value for value in tricky}, "list": tricky,
                "numbers": [0, 7, -3], "flags": [True, False], "empty": {"d": {}, "l": []}}
    text = k8s.to_yaml([document])
    assert yaml.safe_load(text) == document
    assert "- python\n" in text and "- gs://bucket/run\n" in text and '- "yes"\n' in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "message"), [
    (["--name", "MNIST"], "--name='MNIST' is not valid. Fix: use lowercase letters"),
    (["--name", "1mnist"], "starting with a letter"),
    (["--name", "mnist-"], "ending with a letter or digit"),
    (["--name", "m" * 62], "would be 64 characters, over the 63 Kubernetes allows: shorten --name"
                           " by 1 character(s)"),
    (["--name", "m" * 53, "--format", "jobset"], "over the 63 Kubernetes allows"),
    (["--workers", "0"], "--workers=0 is not valid. Fix: use an integer of at least 1"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--cpu", "2 cores"], "--cpu='2 cores' is not valid. Fix: give a Kubernetes quantity"),
    (["--cpu", "-1"], "give a Kubernetes quantity"),
    (["--cpu", "0"], "it is only 0; give CPU cores"),
    (["--memory", "4GB"], "--memory='4GB' is not valid. Fix: give a Kubernetes quantity"),
    (["--memory", "4m"], "it is only 0.004; give bytes with a suffix, e.g. '4Gi'"),
    (["--gpus", "-1"], "--gpus=-1 is not valid"),
    (["--port", "0"], "--port=0 is not valid. Fix: use a TCP port in 1..65535"),
    (["--port", "70000"], "--port=70000 is not valid"),
    (["--namespace", "ML"], "--namespace='ML' is not valid. Fix: use a DNS-1123 label"),
    (["--service-account", "Bad_SA"], "--service-account='Bad_SA' is not valid"),
    (["--gcp-key-secret", "key.json/x"], "--gcp-key-secret='key.json/x' is not valid"),
    (["--env", "NOEQUALS"], "--env='NOEQUALS' is not valid. Fix: write NAME=VALUE"),
    (["--env", "=1"], "--env='=1' is not valid. Fix: write NAME=VALUE"),
    (["--env", "1X=1"], "--env='1X=1' is not valid"),
    (["--env", "TF_CONFIG={}"], "TF_CONFIG is set by launch.k8s or Kubernetes"),
    (["--env", "DISTTRAIN_PORT=1"], "DISTTRAIN_PORT is set by launch.k8s or Kubernetes"),
    (["--env", "A=1", "A=2"], "A is given twice"),
    (["--run-id", "bad id"], "--run-id='bad id' is not a valid run id"),
    (["--run-id", "ends-with-dash-"], "it is also a label value"),
    (["--max-restarts", "-1"], "--max-restarts=-1 is not valid"),
    (["--peer-timeout", "0"], "--peer-timeout=0 is not valid"),
    (["--termination-grace", "0"], "--termination-grace=0 is not valid"),
    (["--checkpoint-url", "gs://b/has space"], "give a URL without spaces"),
    (["--image", "has space:1"], "--image='has space:1' is not valid"),
    (["--format", "deployment"], "argument --format: invalid choice: 'deployment'"),
])
def test_bad_input_exits_2_with_the_fix(args, message, capsys):
    base = ["--name", "mnist", "--workers", "2", "--image", "img:1"]
    with pytest.raises(SystemExit) as exit_info:
        k8s.main([*base, *args, "--", "python", "train.py"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_missing_command_exits_2(capsys):
    for argv in (["--name", "mnist", "--workers", "2", "--image", "img:1"],
                 ["--name", "mnist", "--workers", "2", "--image", "img:1", "--"]):
        with pytest.raises(SystemExit) as exit_info:
            k8s.main(argv)
        assert exit_info.value.code == 2
        assert "Fix: put the command after '--'" in capsys.readouterr().err


@pytest.mark.parametrize(("cpu", "memory"), [("500m", "512Mi"), ("1.5", "1e9"), (".5", "2G"),
                                             ("2", "4096Ki"), ("1000u", "1Ti")])
def test_valid_quantities_are_accepted(cpu, memory):
    k8s.manifests(_config(MINIMAL, cpu=cpu, memory=memory))


@pytest.mark.timeout(60)
def test_cli_writes_files_exits_2_on_errors_and_never_imports_tensorflow(tmp_path):
    cli = [sys.executable, "-m", "launch.k8s", "--name", "mnist", "--workers", "2",
           "--image", "img:1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ok = subprocess.run([*cli, "--output", str(tmp_path), "--", "python", "train.py"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    written = tmp_path / "mnist.yaml"
    assert ok.stdout.strip() == f"wrote {written}"
    assert [d["kind"] for d in yaml.safe_load_all(written.read_text())] == ["NetworkPolicy", "Service", "Job"]

    bad = subprocess.run([*cli, "--workers", "0", "--", "python", "train.py"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--workers=0 is not valid" in bad.stderr and not bad.stdout

    probe = subprocess.run(
        [sys.executable, "-c", "import sys, launch.k8s, launch.entrypoint; "
                               "print(sorted(m for m in sys.modules if 'tensorflow' in m))"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "[]", probe.stderr


@pytest.mark.timeout(60)
def test_example_manifests_in_k8s_are_in_sync_with_the_generator(tmp_path):
    """k8s/ holds what `bash k8s/generate.sh` writes: regenerate and compare byte for byte."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT)}
    for name in ("IMAGE", "BUCKET"):
        env.pop(name, None)
    subprocess.run(["bash", str(REPO_ROOT / "k8s" / "generate.sh"), str(tmp_path)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=60)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    committed = sorted(p.relative_to(REPO_ROOT / "k8s")
                       for p in (REPO_ROOT / "k8s").rglob("*.yaml"))
    assert fresh == committed == [Path(f, "disttrain-demo.yaml") for f in sorted(k8s.FORMATS)]
    for relative in fresh:
        assert (tmp_path / relative).read_text() == (REPO_ROOT / "k8s" / relative).read_text(), (
            f"k8s/{relative} is stale: run `bash k8s/generate.sh`")
    for relative in committed:
        text = (REPO_ROOT / "k8s" / relative).read_text()
        assert [str(p) for p in linter.run(text, YAMLLINT)] == [], relative
    job_file = REPO_ROOT / "k8s" / "job" / "disttrain-demo.yaml"
    policy, service, job = yaml.safe_load_all(job_file.read_text())
    for document in (policy, service, job):
        kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)
    container = _container(job["spec"]["template"]["spec"])
    assert container["args"][:3] == ["python", "-m", "disttrain.demo"]
    assert _env(container)["DISTTRAIN_CHECKPOINT_URL"].startswith("gs://")
    # Deleting and applying the example again must start a new run, not continue the old one.
    assert _env(container)["DISTTRAIN_RUN_ID"] == {"fieldRef": {"fieldPath": RUN_ID_FIELDS["job"]}}
