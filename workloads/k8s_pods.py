"""What Kubernetes gives each pod of a manifest that `launch.k8s` generates, without Kubernetes.

Shared by the tests and benchmarks that run a generated Indexed Job's pods themselves: simulated
pods in network namespaces (`workloads.pod_network`: tests/launch/test_entrypoint.py, the
link-down fault of `python -m benchmarks.faults`) and podman containers
(tests/container/test_container.py).
Each pod gets what the kubelet would derive from the manifest: the container's `env` with its
Downward API references resolved, `JOB_COMPLETION_INDEX` and `HOSTNAME` (which the Job
controller and the kubelet add), `$(VAR)` expansion in `command` and `args`, and the DNS names
the headless Service publishes.

Example:

```
container = pod_spec(documents)["containers"][0]
env = kubernetes_env(container, 1, "mnist-1", "default")
argv = pod_argv(container, env)
```
"""

from __future__ import annotations

import dataclasses
import re

from launch import entrypoint

# The pod labels the Job and JobSet controllers add (they hold the owner's UID).
CONTROLLER_LABELS = (entrypoint.JOB_UID_LABEL, entrypoint.JOBSET_UID_LABEL)
OWNER_UID = "0b4c9d8e-3f1a-4c2b-9e7d-5a6f7b8c9d0e"


def pod_spec(documents: list[dict]) -> dict:
    """The workers' pod template spec: of the Job, of the Job inside a JobSet, or of the
    trainer step of a TrainJob's runtime (the workload is the manifest's last document)."""
    workload = documents[-1]
    if workload["kind"] == "TrainJob":
        return trainer_v2_pods(documents)[0].template_spec
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


# Kubeflow Trainer v2.3.0 (pkg/constants/constants.go): the label that marks a runtime's
# replicated job as the TrainJob's trainer step, and the name of its container.
TRAINER_STEP_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_NODE = "node"


@dataclasses.dataclass(frozen=True)
class TrainerPod:
    """One pod of the JobSet that Trainer v2 makes of a TrainJob."""

    replicated_job: str
    index: int
    """JOB_COMPLETION_INDEX (the pod's index in its Indexed Job)."""
    hostname: str
    subdomain: str
    template_spec: dict


def trainer_v2_pods(documents: list[dict]) -> list[TrainerPod]:
    """The pods Kubeflow Trainer v2.3.0 and JobSet create for the manifests' TrainJob, modelled
    on Trainer's source: the JobSet is named after the TrainJob (plugins/jobset/jobset.go
    Build); the trainer step runs `spec.trainer.numNodes` pods, else the runtime's
    `mlPolicy.numNodes`, else 1 (core/trainingruntime.go newRuntimeInfo, plugins/plainml), in
    one replica; another replicated job runs its Job's `parallelism` pods in each of its
    replicas; pod i of replica r of replicated job J is `<trainjob>-<J>-<r>-<i>` under the
    subdomain `network.subdomain`, else the TrainJob's name (jobset.go IdentifyPodNetwork).

    Raises:
        NotImplementedError: for TrainJob fields this model does not apply (it would be wrong
            about them rather than ignore them).
    """
    trainjob = next(d for d in documents if d["kind"] == "TrainJob")
    ref = trainjob["spec"]["runtimeRef"]
    (runtime,) = [d for d in documents if d["kind"] == ref["kind"]
                  and d["metadata"]["name"] == ref["name"]]
    trainer = trainjob["spec"].get("trainer", {})
    if set(trainjob["spec"]) - {"runtimeRef", "trainer"} or set(trainer) - {"numNodes"}:
        raise NotImplementedError(f"TrainJob fields beyond numNodes: {trainjob['spec']}")
    name = trainjob["metadata"]["name"]
    spec = runtime["spec"]["template"]["spec"]
    subdomain = spec.get("network", {}).get("subdomain", name)
    pods = []
    for replicated in spec["replicatedJobs"]:
        job = replicated["template"]
        if job["metadata"].get("labels", {}).get(TRAINER_STEP_LABEL) == "trainer":
            count = trainer.get("numNodes", runtime["spec"].get("mlPolicy", {}).get("numNodes", 1))
            replicas = 1
        else:
            count, replicas = job["spec"].get("parallelism", 1), replicated.get("replicas", 1)
        pods += [TrainerPod(replicated["name"], i, f"{name}-{replicated['name']}-{r}-{i}",
                            subdomain, job["spec"]["template"]["spec"])
                 for r in range(replicas) for i in range(count)]
    return pods


def kubernetes_env(container: dict, index: int, hostname: str, namespace: str,
                   labels: dict[str, str] | None = None, attempt: int = 0) -> dict[str, str]:
    """The environment Kubernetes gives this container in pod `index` of an Indexed Job whose
    pods carry `labels` (by default: each controller label with the fixed UID `OWNER_UID`, and
    JobSet's restart-attempt label with `attempt`). Like the kubelet, a
    `metadata.labels['KEY']` reference to a label the pod lacks gives an empty string. The
    image's own variables (PATH, HOME) are not included."""
    if labels is None:
        labels = {**dict.fromkeys(CONTROLLER_LABELS, OWNER_UID),
                  entrypoint.JOBSET_RESTART_LABEL: str(attempt)}
    env = {"HOSTNAME": hostname, "JOB_COMPLETION_INDEX": str(index)}
    for variable in container["env"]:
        if "valueFrom" in variable:
            path = variable["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            if label:
                env[variable["name"]] = labels.get(label[1], "")
            else:
                env[variable["name"]] = {"metadata.namespace": namespace}[path]
        else:
            env[variable["name"]] = variable["value"]
    return env


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command and args (`$$` escapes a `$`)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  argument)


def pod_argv(container: dict, env: dict[str, str]) -> list[str]:
    """The container's `command` + `args`, expanded against `env` as the kubelet does."""
    return [expand(a, env) for a in container["command"] + container["args"]]


def dns_names(hostname: str, subdomain: str, namespace: str) -> list[str]:
    """The names a headless Service `subdomain` publishes for the pod `hostname`."""
    fqdn = f"{hostname}.{subdomain}.{namespace}.svc"
    return [fqdn, f"{fqdn}.cluster.local"]
