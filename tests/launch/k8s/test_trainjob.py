"""Tests of `launch.k8s --format trainjob` (Kubeflow Trainer v2): the TrainJob and its
TrainingRuntime validate against Trainer v2.3.0's published CRD schemas (tests/launch/k8s/schemas/
kubeflow-trainer, strict: unknown fields rejected), meet the rules of Trainer's webhook, embed
the jobset format's restart rules, and the pods that Trainer v2 and JobSet would create
(workloads/k8s_pods.py `trainer_v2_pods`) derive one cluster's TF_CONFIG; simulated pods (network
namespaces, tests/launch/test_entrypoint.py) train a real 2-worker job beside an evaluator.

The CRD schemas' CEL rules (x-kubernetes-validations) are not evaluated here; the ones that
apply to these objects are immutability rules and "only one of the policies" (none is set).
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from disttrain.cluster import build_tf_config
from disttrain.errors import ClusterConfigError
from launch import entrypoint, k8s, tf_config
from workloads import k8s_pods
from workloads.pod_network import PodNetwork, kubernetes_env_here
from tests.support.pod_network import wait_for
from tests.launch.k8s.test_k8s import (
    CONFIGS,
    K8S_VERSIONS,
    MINIMAL,
    _check_indexed_job_spec,
    _config,
    _container,
    _env,
)

SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kubeflow-trainer"
CRD_FILES = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml.xz",
             "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml.xz"}


@functools.cache
def _crd(kind: str) -> dict:
    with lzma.open(SCHEMAS / CRD_FILES[kind]) as stream:
        return yaml.load(stream, Loader=yaml.CSafeLoader)


def _strict(schema: dict) -> dict:
    """`schema` rejecting fields it does not list, as the API server does under
    `kubectl apply --validate=strict` (by default it would drop them silently)."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: _strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(s) for s in schema[key]]
    return out


@functools.cache
def _validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd = _crd(kind)
    assert crd["spec"]["names"]["kind"] == kind
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))


def _schema_errors(document: dict) -> list[str]:
    validator = _validator(document["kind"], document["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_schema_files_are_the_published_ones():
    """Each stored CRD decompresses to the bytes its README records (Trainer v2.3.0)."""
    readme = (SCHEMAS / "README.md").read_text()
    for kind, name in CRD_FILES.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        recorded = re.findall(r"`([0-9a-f]{64})`", row)
        assert recorded == [hashlib.sha256(lzma.open(SCHEMAS / name).read()).hexdigest()], name
        assert _crd(kind)["metadata"]["name"] == name.removesuffix(".yaml.xz").split("_")[1] \
            + "." + "trainer.kubeflow.org"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", CONFIGS)
def test_trainjob_and_runtime_validate_and_keep_the_jobset_restart_rules(which):
    for evaluator in (False, True):
        config = _config(CONFIGS[which], format="trainjob", evaluator=evaluator)
        policy, runtime, trainjob = k8s.manifests(config)
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)
        for document in (runtime, trainjob):
            assert document["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
            assert _schema_errors(document) == [], document["kind"]
            assert document["metadata"].get("namespace") == config.namespace
        # The TrainJob refers to this runtime (a namespaced TrainingRuntime must be in the
        # TrainJob's namespace) and asks for --workers nodes, as the runtime does.
        assert trainjob["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
            "name": runtime["metadata"]["name"]}
        assert trainjob["spec"]["trainer"] == {"numNodes": config.workers}
        assert runtime["spec"]["mlPolicy"] == {"numNodes": config.workers}, (
            "no framework policy: Trainer v2 injects no environment of its own")

        spec = runtime["spec"]["template"]["spec"]
        jobset = k8s.manifests(_config(config, format="jobset"))[1]["spec"]
        assert spec["failurePolicy"] == jobset["failurePolicy"]
        assert spec["network"] == jobset["network"]
        # Trainer v2.3.0's webhook (pkg/webhooks/trainingruntime_webhook.go): the trainer
        # step has replicas 1 and a container named "node".
        steps = [job for job in spec["replicatedJobs"] if job["template"]["metadata"][
            "labels"].get(k8s_pods.TRAINER_STEP_LABEL) == "trainer"]
        (step,) = steps
        assert step is spec["replicatedJobs"][0] and step["replicas"] == 1
        assert spec["successPolicy"]["targetReplicatedJobs"][0] == step["name"]
        job_spec = step["template"]["spec"]
        assert _container(job_spec["template"]["spec"])["name"] == k8s_pods.TRAINER_NODE
        as_job = {"apiVersion": "batch/v1", "kind": "Job", "spec": job_spec,
                  "metadata": {"name": config.job_name, **step["template"]["metadata"]}}
        kubernetes_validate.validate(as_job, K8S_VERSIONS[-1], strict=True)
        _check_indexed_job_spec(job_spec, config, 0)
        env = _env(_container(job_spec["template"]["spec"]))
        assert env["DISTTRAIN_NUM_WORKERS"] == str(config.workers)
        hostnames = [pod.hostname for pod in k8s_pods.trainer_v2_pods([runtime, trainjob])]
        assert hostnames[:config.workers] == [config.hostname(i) for i in range(config.workers)]
        assert hostnames[config.workers:] == ([config.evaluator_hostname] if evaluator else [])


def test_strict_crd_validation_rejects_unknown_fields_and_wrong_types():
    """The check above can fail: a misspelt field, a string count, a runtime without spec."""
    _, runtime, trainjob = k8s.manifests(_config(MINIMAL, format="trainjob"))
    bad = json.loads(json.dumps(trainjob))
    bad["spec"]["trainer"] = {"numNode": 2}
    assert _schema_errors(bad) == [
        "spec.trainer: Additional properties are not allowed ('numNode' was unexpected)"]
    bad["spec"]["trainer"] = {"numNodes": "2"}
    assert _schema_errors(bad) == ["spec.trainer.numNodes: '2' is not of type 'integer'"]
    del bad["spec"]["runtimeRef"]
    assert "spec: 'runtimeRef' is a required property" in _schema_errors(bad)
    bad = json.loads(json.dumps(runtime))
    container = bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFS"] = True
    (error,) = _schema_errors(bad)
    assert "'readOnlyRootFS' was unexpected" in error


@pytest.mark.timeout(60)
def test_pods_trainer_v2_would_create_derive_one_cluster_and_refuse_a_mismatch():
    """Each pod Trainer v2 and JobSet make of the TrainJob gets the worker (or evaluator) task
    of the cluster of the pods Trainer lists; a TrainJob whose numNodes or name disagrees
    with the runtime's pods is refused (exit 2) instead of running a wrong cluster."""
    config = _config(MINIMAL, format="trainjob", evaluator=True, namespace="ml")
    documents = k8s.manifests(config)
    pods = k8s_pods.trainer_v2_pods(documents)
    workers = [p for p in pods if p.replicated_job == k8s_pods.TRAINER_NODE]
    addresses = [f"{p.hostname}.{p.subdomain}.ml.svc:{config.port}" for p in workers]
    assert addresses == tf_config.indexed_job_addresses(
        config.job_name, config.name, config.workers, config.port, "ml")
    assert len(pods) == config.workers + 1

    def derived(pod: k8s_pods.TrainerPod, documents: list[dict] = documents) -> dict:
        env = k8s_pods.kubernetes_env(_container(pod.template_spec), pod.index, pod.hostname,
                                      "ml", attempt=1)
        assert env["DISTTRAIN_RUN_ID"] == k8s_pods.OWNER_UID, "the JobSet's UID label"
        assert env["DISTTRAIN_ATTEMPT"] == "1", "JobSet's restart-attempt label"
        return entrypoint.tf_config_from_env(env)

    for pod in pods:
        expected = (build_tf_config(addresses, "worker", pod.index) if pod in workers
                    else build_tf_config(addresses, "evaluator", 0))
        assert derived(pod) == expected, pod.hostname

    more = json.loads(json.dumps(documents))
    more[-1]["spec"]["trainer"]["numNodes"] = config.workers + 1
    extra = k8s_pods.trainer_v2_pods(more)[config.workers]
    with pytest.raises(ClusterConfigError, match=r"JOB_COMPLETION_INDEX='4' must be an integer "
                                                 r"in 0..3"):
        derived(extra, more)
    renamed = json.loads(json.dumps(documents))
    renamed[-1]["metadata"]["name"] = "other"
    with pytest.raises(ClusterConfigError, match="HOSTNAME='other-node-0-0' but "
                                                 "DISTTRAIN_JOB_NAME='mnist-node-0'"):
        derived(k8s_pods.trainer_v2_pods(renamed)[0], renamed)


TRAIN_PROGRAM = """
import json, os
task = json.loads(os.environ["TF_CONFIG"])["task"]
if task["type"] == "evaluator":
    print("EVALUATOR " + os.environ["TF_CONFIG"], flush=True)
    raise SystemExit(0)
from tests.keras_compat import workloads
summary = workloads.sequential(batchnorm=False, epochs=1)
print("RESULT " + json.dumps({"index": task["index"], "loss": summary["history"]["loss"],
                              "weights": summary["weights"]}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulated_trainjob_pods_train_a_real_2_worker_job(netns, tmp_path):
    """The pods Trainer v2 would create for a 2-node TrainJob with an evaluator, each in its
    own network namespace with the hostname, index, environment and DNS names it would get,
    run the generated command: the workers train one model together (same weights on both),
    the evaluator gets the evaluator task of their cluster."""
    config = k8s.JobConfig(name="demo", workers=2, image="unused", format="trainjob",
                           evaluator=True, peer_timeout=120, command=("python", "-c", TRAIN_PROGRAM),
                           env=(("TF_CPP_MIN_LOG_LEVEL", "3"),))
    pods = k8s_pods.trainer_v2_pods(k8s.manifests(config))
    logs = [tmp_path / f"{pod.hostname}.log" for pod in pods]
    with PodNetwork(len(pods)) as network:
        for i, pod in enumerate(pods):
            network.publish(i, k8s_pods.dns_names(pod.hostname, pod.subdomain, "default"))
        for i, pod in enumerate(reversed(pods)):
            container = _container(pod.template_spec)
            env = kubernetes_env_here(container, pod.index, pod.hostname, "default", tmp_path)
            argv = k8s_pods.pod_argv(container, env)
            assert argv[:3] == ["python", "-m", "launch.entrypoint"]
            network.start(len(pods) - 1 - i, argv[3:], env, logs[len(pods) - 1 - i])
            time.sleep(0.5)
        outputs = wait_for(network.procs, list(reversed(logs)), timeout=200)[::-1]
        codes = [p.returncode for p in network.procs][::-1]
    assert codes == [0, 0, 0], "\n---\n".join(outputs)
    results = [_line(output, "RESULT ") for output in outputs[:2]]
    assert [r["index"] for r in results] == [0, 1]
    assert results[0]["weights"] == results[1]["weights"] and results[0]["weights"]
    assert results[0]["loss"] == results[1]["loss"]
    evaluator = _line(outputs[2], "EVALUATOR ")
    assert evaluator["task"] == {"type": "evaluator", "index": 0}
    assert evaluator["cluster"] == {"worker": [
        f"demo-node-0-{i}.demo.default.svc:2222" for i in range(2)]}


def _line(output: str, prefix: str) -> Any:
    line = next((l for l in output.splitlines() if l.startswith(prefix)), None)
    assert line is not None, output
    return json.loads(line.removeprefix(prefix))
