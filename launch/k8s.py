"""`python -m launch.k8s`: Kubernetes manifests for a disttrain job.

```
python -m launch.k8s --name mnist --workers 4 --image REGISTRY/disttrain:0.1.0 \\
    --checkpoint-url gs://BUCKET/disttrain \\
    -- python -m disttrain.demo --output-dir '$(DISTTRAIN_CHECKPOINT_URL)'
```

prints YAML for `kubectl apply -f -` (or, with `--output DIR`, writes `DIR/<name>.yaml`).
Formats:

- `job` (default; plain Kubernetes, no operator): a headless Service (`clusterIP: None`,
  `publishNotReadyAddresses: true`, so pod names resolve before the pods are ready) and an
  Indexed Job whose pods are `<name>-<i>.<name>`. The Job replaces a failed pod only once it has
  fully terminated (`podReplacementPolicy: Failed`, so no index ever runs twice at once), fails
  at once on exit code 2 (a configuration error: retrying cannot help), does not count evictions
  and preemptions against the restart budget (neither the evicted pod nor its peers, which exit
  75 after BackupAndRestore saved a backup at a step all agreed on), and succeeds when worker 0
  (the chief) succeeds. `--termination-grace` (terminationGracePeriodSeconds) must leave time
  to finish a step and write that backup.
  Under MultiWorkerMirroredStrategy a lost worker makes every peer fail, so one restart of the
  group costs up to N pod failures: `backoffLimit` is `--max-restarts` x N.
- `jobset` (`jobset.x-k8s.io/v1alpha2`): the same Indexed Job inside a JobSet, which restarts
  the whole group (`failurePolicy.maxRestarts` = `--max-restarts`) and creates the Service.
- `tfjob` (`kubeflow.org/v1`, Kubeflow Training Operator v1): the operator sets TF_CONFIG itself;
  the entrypoint then uses it as is. Its workers use `restartPolicy: OnFailure`, not
  `ExitCode`: see `TFJOB_RESTART_POLICY_NOTE`.
- `trainjob` (`trainer.kubeflow.org/v1alpha1`, Kubeflow Trainer v2, which has no TFJob): a
  TrainingRuntime holding the `jobset` format's JobSet spec (its worker replicated job and
  container named `node` and labelled as the TrainJob's trainer step, as Trainer v2 requires),
  and a TrainJob of the same name referring to it with `numNodes` = `--workers`. Trainer v2
  makes the JobSet, named after the TrainJob; the pods derive TF_CONFIG as in a JobSet (see
  `TRAINJOB_NOTE`).

`--evaluator` adds an evaluator task, one pod outside the training group that runs the same
command (the program tells it apart by TF_CONFIG, e.g. with `disttrain.SidecarEvaluator`):
see `EVALUATOR_NOTE`.

Run id (`DISTTRAIN_RUN_ID`: where the run's checkpoints, backups and logs go). Without
`--run-id`, every instance of the job gets its own, the same on every pod and across pod
restarts and replacements (so BackupAndRestore resumes after a pod failure), and a new one when
the job is deleted and created again under the same name (so a new run never continues, or
overwrites, an old one): see `RUN_ID_NOTE`. A given `--run-id` is used as is, and then keeping
it unique is the user's business. The jobset and trainjob pods also read DISTTRAIN_ATTEMPT
(the group's restart attempt, which TrainingReport records) from JobSet's
`jobset.sigs.k8s.io/restart-attempt` pod label.

Every pod runs `python -m launch.entrypoint --peer-timeout S -- <command>`: the entrypoint
derives TF_CONFIG from the Job's environment, waits until every peer resolves and accepts TCP,
then execs the command. Container `args` may use `$(VAR)` references to the container's
environment (Kubernetes expands them), e.g. `$(DISTTRAIN_CHECKPOINT_URL)`.

Security (docs/security.md): every format comes with a NetworkPolicy admitting the gRPC port
(TensorFlow's server is unauthenticated) only from the same job's pods, evaluator included (it
takes effect where the cluster's network plugin enforces NetworkPolicy). The pods meet the
"restricted" Pod Security Standard: non-root (`POD_USER`), `seccompProfile: RuntimeDefault`,
no privilege escalation, every capability dropped, a read-only root filesystem with emptyDir
volumes at /tmp and HOME; no service-account token is mounted unless `--service-account` is
given.

gs:// credentials (gcsfs uses Google's default credentials): with Workload Identity, pass
`--service-account KSA` (a Kubernetes ServiceAccount allowed to act as a Google service
account); with a key file, `--gcp-key-secret SECRET` mounts the Secret's `key.json` and points
`GOOGLE_APPLICATION_CREDENTIALS` at it.

Invalid input exits with code 2 and a message naming the option and the fix. Nothing here
imports TensorFlow; the YAML is written with PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from disttrain.cluster import (
    ENV_ATTEMPT,
    ENV_RUN_ID,
    ENV_TF_CONFIG,
    new_run_id,
    validate_run_id,
)
from disttrain.errors import (
    EXIT_CONFIG_ERROR,
    PREEMPTED_EXIT_CODE,
    ClusterConfigError,
    DisttrainError,
)
from launch import entrypoint
from launch.cli import split_command

FORMATS = ("job", "jobset", "tfjob", "trainjob")
ENV_CHECKPOINT_URL = "DISTTRAIN_CHECKPOINT_URL"
ENV_GOOGLE_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"
GCP_KEY_DIR = "/var/secrets/google"
GCP_KEY_FILE = "key.json"
GPU_RESOURCE = "nvidia.com/gpu"
REPLICATED_JOB = "worker"
# Kubeflow Trainer v2 (pkg/constants, v2.3.0): a runtime's replicated job labelled with
# TRAINER_STEP_LABEL is the TrainJob's trainer step: its Job runs numNodes pods and its
# container named TRAINER_NODE gets the TrainJob's trainer fields; the validating webhook
# rejects a trainer step without that container or with replicas other than 1.
TRAINER_API_GROUP = "trainer.kubeflow.org"
TRAINER_API = f"{TRAINER_API_GROUP}/v1alpha1"
TRAINER_NODE = "node"
TRAINER_STEP_LABEL = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
EVALUATOR = "evaluator"
# The evaluator's Job retries its pod in place (restartPolicy OnFailure) and never fails: a
# failed Job would restart (JobSet) or outlive nothing of the training, and no evaluator
# failure may stop training. Kubernetes's largest backoffLimit (int32).
EVALUATOR_BACKOFF_LIMIT = 2**31 - 1
EVALUATOR_LABEL = {"app.kubernetes.io/component": EVALUATOR}
MAX_HOSTNAME = 63
# docker/Dockerfile's user (USER 1000:1000) and its home; the pods run as that user with a
# read-only root filesystem, so HOME (Keras's ~/.keras, matplotlib's cache) and /tmp
# (TensorFlow's and Python's temporary files) are emptyDir volumes.
POD_USER = 1000
HOME = "/home/disttrain"
SCRATCH_VOLUMES = (("tmp", "/tmp"), ("home", HOME))
DEFAULT_TERMINATION_GRACE = 120
# Pod label holding the UID of the object that owns one job instance, per format; the pods
# read DISTTRAIN_RUN_ID from it through the Downward API. TFJob pods have no such label.
RUN_ID_LABELS = {"job": entrypoint.JOB_UID_LABEL, "jobset": entrypoint.JOBSET_UID_LABEL,
                 "trainjob": entrypoint.JOBSET_UID_LABEL}
RUN_ID_LABEL = "disttrain/run-id"
# Formats whose pods carry JobSet's restart-attempt label; their DISTTRAIN_ATTEMPT (recorded
# in TrainingReport's history) comes from it. A Job's or TFJob's pods have no group attempt.
# The JobSet controller stamps the label on each Job's pod template (labelAndAnnotateObject in
# its source); read there, not run against a JobSet controller here (simulated pods only).
ATTEMPT_FORMATS = ("jobset", "trainjob")

RUN_ID_NOTE = f"""\
run id (DISTTRAIN_RUN_ID: the name of the run's checkpoints, backups and logs):
  without --run-id, each instance of the job gets its own, the same on every pod and across
  pod restarts and replacements (so BackupAndRestore resumes after a pod failure), and a new
  one when the job is deleted and applied again under the same name (so a new run never
  continues or overwrites an old one's files):
    job     the Job's UID, from the pod label {entrypoint.JOB_UID_LABEL}
            (set by Kubernetes 1.27 or newer);
    jobset  the JobSet's UID, from the pod label {entrypoint.JOBSET_UID_LABEL}
            (set by JobSet v0.9.0 or newer; the Jobs of a JobSet are recreated on every
            restart of the group, so their own UIDs would not do);
    trainjob the UID of the JobSet that Trainer v2 creates once for each TrainJob, from the
            same label (Trainer v2.3 installs JobSet v0.12.0);
    tfjob   TFJob pods carry no label with the TFJob's UID (training-operator v1 sets only
            training.kubeflow.org/job-name, replica-type, replica-index, job-role and
            operator-name), so a fresh id is written into the manifest when it is generated:
            applying that same file again, even after deleting the TFJob, continues that
            run; generate a new manifest for a new run.
    job with --evaluator: the evaluator runs in a Job of its own, whose UID differs from the
            training Job's, so a fresh id is written into the manifest, as for tfjob.
  With an older Kubernetes or JobSet the label is missing, the run id is empty, and each pod
  stops at once with exit code 2 and a message (no run under a made-up id).
  With --run-id ID every instance uses ID as is: keeping it unique is then your business
  (reusing it continues that run: its best checkpoint, backups and history)."""

TFJOB_RESTART_POLICY_NOTE = """\
TFJob restart policy: OnFailure. The TFJob v1 API also has ExitCode (exit codes 1-127 are
  permanent, 128-255 are retried), which would make the entrypoint's exit code 2 (a
  configuration error) final, but also exit code 1, which is how the surviving workers of
  MultiWorkerMirroredStrategy exit when a peer is lost (an uncaught UnavailableError), and 3
  (peers not met within --peer-timeout): one preempted or OOM-killed pod would fail the whole
  TFJob and --max-restarts would never apply. Retryable codes under ExitCode recreate the pod,
  and training-operator v1 counts only container restarts against backoffLimit, so they are
  retried without limit (kubeflow/trainer issue 2045). With OnFailure, a configuration error is
  retried in place (with the kubelet's growing back-off) until backoffLimit (--max-restarts x
  workers) container restarts, then the TFJob fails. The job and jobset formats fail at once on
  exit code 2 (podFailurePolicy FailJob)."""

_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
# Kubernetes resource quantity: <number><suffix>, suffix binary SI, decimal SI or exponent.
_QUANTITY = re.compile(
    r"(?P<number>\d+(\.\d*)?|\.\d+)(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][-+]?\d+)?")
_SUFFIX_SCALE = {
    "": 1, "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


EVALUATOR_NOTE = f"""\
evaluator (--evaluator): one more pod, outside the training group, with the same command,
  image, run id and checkpoint URL; its TF_CONFIG task is the evaluator of the workers'
  cluster. Its failures never stop training: it restarts in place (restartPolicy OnFailure).
    job     a second Job, <name>-{EVALUATOR} (its pod gets DISTTRAIN_TASK_TYPE={EVALUATOR});
            backoffLimit {EVALUATOR_BACKOFF_LIMIT}, so it never fails.
    jobset  a second replicated job, {EVALUATOR}, likewise; the JobSet succeeds when both
            the workers and the evaluator have (the evaluator ends once training has
            finished), so it is not deleted before it evaluated the last checkpoint.
    trainjob as for jobset, in the TrainingRuntime's JobSet spec (not a trainer step, so
            numNodes does not apply to it).
    tfjob   an Evaluator replica. The operator marks the TFJob succeeded when the chief
            finishes and cleanPodPolicy Running would then delete the evaluator before it
            evaluated the last checkpoint (kubeflow/trainer issue 1658), so the policy is
            None. Its container restarts count against runPolicy.backoffLimit like the
            workers' (the operator counts every replica's), so an evaluator that keeps
            crashing can end a TFJob: the one format where that holds."""


TRAINJOB_NOTE = f"""\
trainjob (Kubeflow Trainer v2): a TrainingRuntime and a TrainJob, both named --name. Trainer
  v2 creates a JobSet named after the TrainJob from the runtime's JobSet spec; its trainer
  step ('{TRAINER_NODE}') runs the TrainJob's numNodes pods, <name>-{TRAINER_NODE}-0-<i>.<name>
  as in the jobset format, and the entrypoint derives TF_CONFIG from them. Restarts, the exit-code-2 rule and the evaluator are the jobset
  format's. The TrainJob's trainer sets only numNodes: the command, image and environment are
  in the runtime. Change --workers and regenerate rather than editing numNodes (the pods'
  DISTTRAIN_NUM_WORKERS would disagree: extra pods exit 2, missing ones time out), and give
  the TrainJob no trainer.command (it would replace the entrypoint). The runtime serves only a
  TrainJob of its own name (another one's pods exit 2 naming the mismatch)."""


class ManifestConfigError(DisttrainError, ValueError):
    """An option of `launch.k8s` cannot produce a valid manifest."""


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything a manifest is made from; `validate()` checks it all."""

    name: str
    workers: int
    image: str
    command: tuple[str, ...]
    namespace: str | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 0
    port: int = 2222
    checkpoint_url: str | None = None
    service_account: str | None = None
    gcp_key_secret: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    run_id: str | None = None
    max_restarts: int = 3
    peer_timeout: int = int(entrypoint.DEFAULT_PEER_TIMEOUT)
    termination_grace: int = DEFAULT_TERMINATION_GRACE
    format: str = "job"
    tfjob_run_id: str = dataclasses.field(default_factory=new_run_id)
    """The run id of a TFJob (or of a Job with an evaluator) without `run_id`, generated with
    the config (see RUN_ID_NOTE)."""
    evaluator: bool = False

    @property
    def fixed_run_id(self) -> str | None:
        """The run id written into the manifest: `run_id`, else `tfjob_run_id` for a TFJob or
        a Job with an evaluator; None when each Job or JobSet instance's UID is the run id
        (read in the pod)."""
        if self.run_id is not None:
            return self.run_id
        if self.format == "tfjob" or (self.format == "job" and self.evaluator):
            return self.tfjob_run_id
        return None

    @property
    def run_id_env(self) -> str | dict[str, Any]:
        """The value of DISTTRAIN_RUN_ID in the container: a string or a `valueFrom`."""
        fixed = self.fixed_run_id
        if fixed is not None:
            return fixed
        label = RUN_ID_LABELS[self.format]
        return {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}

    @property
    def replicated_job(self) -> str:
        """Name of the workers' replicated job (jobset, trainjob) and of their container."""
        return TRAINER_NODE if self.format == "trainjob" else REPLICATED_JOB

    @property
    def job_name(self) -> str:
        """Name of the Indexed Job whose pods run the workers (also inside a JobSet: JobSet
        names it <jobset>-<replicated job>-<job index>, Trainer v2 the JobSet <trainjob>)."""
        if self.format in ("jobset", "trainjob"):
            return f"{self.name}-{self.replicated_job}-0"
        return self.name

    def hostname(self, index: int) -> str:
        """Hostname of worker `index`'s pod."""
        if self.format == "tfjob":
            return f"{self.name}-worker-{index}"
        return f"{self.job_name}-{index}"

    @property
    def evaluator_hostname(self) -> str:
        """Hostname of the evaluator's pod (the evaluator's Job is Indexed, one pod)."""
        if self.format == "tfjob":
            return f"{self.name}-{EVALUATOR}-0"
        if self.format in ("jobset", "trainjob"):
            return f"{self.name}-{EVALUATOR}-0-0"
        return f"{self.name}-{EVALUATOR}-0"

    def validate(self) -> "JobConfig":
        """Returns self when every field can go into a valid manifest.

        Raises:
            ManifestConfigError: naming the option, its value, and the fix.
        """
        if self.format not in FORMATS:
            _fail("--format", self.format, f"use one of {', '.join(FORMATS)}")
        if not _DNS1035_LABEL.fullmatch(self.name) or len(self.name) > MAX_HOSTNAME:
            _fail("--name", self.name, "use lowercase letters, digits and '-', starting with a "
                  "letter and ending with a letter or digit (a DNS-1035 label, e.g. 'mnist-1')")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            _fail("--workers", self.workers, "use an integer of at least 1")
        longest = self.hostname(self.workers - 1)
        if len(longest) > MAX_HOSTNAME:
            _fail("--name", self.name,
                  f"pod hostname {longest!r} would be {len(longest)} characters, over the "
                  f"{MAX_HOSTNAME} Kubernetes allows: shorten --name by "
                  f"{len(longest) - MAX_HOSTNAME} character(s)")
        if self.evaluator and len(self.evaluator_hostname) > MAX_HOSTNAME:
            _fail("--name", self.name,
                  f"the evaluator's hostname {self.evaluator_hostname!r} would be over the "
                  f"{MAX_HOSTNAME} characters Kubernetes allows: shorten --name by "
                  f"{len(self.evaluator_hostname) - MAX_HOSTNAME} character(s)")
        if not self.image or any(c.isspace() for c in self.image) or self.image.startswith("-"):
            _fail("--image", self.image, "give an image reference such as "
                  "'REGISTRY/disttrain:0.1.0'")
        if not self.command:
            _fail("command", "", "put the command after '--', e.g. -- python train.py")
        if self.namespace is not None and (
                not _DNS1123_LABEL.fullmatch(self.namespace) or len(self.namespace) > 63):
            _fail("--namespace", self.namespace, "use a DNS-1123 label: lowercase letters, "
                  "digits and '-', at most 63 characters")
        for option, value in (("--service-account", self.service_account),
                              ("--gcp-key-secret", self.gcp_key_secret)):
            if value is not None and (not _DNS1123_SUBDOMAIN.fullmatch(value) or len(value) > 253):
                _fail(option, value, "use a DNS-1123 subdomain: lowercase letters, digits, '-' "
                      "and '.', at most 253 characters")
        _check_quantity("--cpu", self.cpu, minimum=decimal.Decimal("0.001"),
                        hint="CPU cores, e.g. '2' or '500m'")
        _check_quantity("--memory", self.memory, minimum=decimal.Decimal(2**20),
                        hint="bytes with a suffix, e.g. '4Gi' or '512Mi' (lowercase 'm' means "
                             "thousandths)")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            _fail("--gpus", self.gpus, "use an integer of at least 0")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65535:
            _fail("--port", self.port, "use a TCP port in 1..65535")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            _fail("--max-restarts", self.max_restarts, "use an integer of at least 0")
        if not isinstance(self.peer_timeout, int) or self.peer_timeout < 1:
            _fail("--peer-timeout", self.peer_timeout, "use a number of seconds of at least 1")
        if isinstance(self.termination_grace, bool) or not isinstance(
                self.termination_grace, int) or self.termination_grace < 1:
            _fail("--termination-grace", self.termination_grace,
                  "use a number of seconds of at least 1, long enough to finish a training "
                  "step and write a backup")
        if self.checkpoint_url is not None and (
                not self.checkpoint_url or any(c.isspace() for c in self.checkpoint_url)):
            _fail("--checkpoint-url", self.checkpoint_url,
                  "give a URL without spaces, e.g. gs://BUCKET/run")
        fixed = self.fixed_run_id
        if fixed is not None:
            try:
                validate_run_id(fixed, "--run-id")
            except ClusterConfigError as e:
                raise ManifestConfigError(str(e)) from None
            if len(fixed) > 63 or not _LABEL_VALUE.fullmatch(fixed):
                _fail("--run-id", fixed, "it is also a label value: at most 63 characters, "
                      "ending with a letter or digit")
        self._check_env()
        return self

    def _check_env(self) -> None:
        reserved = {name for name, _ in _generated_env(self)} | {
            ENV_TF_CONFIG, entrypoint.ENV_COMPLETION_INDEX, entrypoint.ENV_TASK_TYPE}
        seen: set[str] = set()
        for name, value in self.env:
            if not _ENV_NAME.fullmatch(name):
                _fail("--env", f"{name}={value}", "write NAME=VALUE with NAME made of letters, "
                      "digits, '_', '-' and '.', not starting with a digit")
            if name in reserved:
                _fail("--env", f"{name}={value}", f"{name} is set by launch.k8s or Kubernetes; "
                      "use the matching option instead (--run-id, --checkpoint-url, "
                      "--gcp-key-secret, --workers, --port)")
            if name in seen:
                _fail("--env", f"{name}={value}", f"{name} is given twice; keep one")
            seen.add(name)


def _fail(option: str, value: Any, fix: str) -> NoReturn:
    raise ManifestConfigError(f"{option}={value!r} is not valid. Fix: {fix}.")


def _check_quantity(option: str, value: str, minimum: decimal.Decimal, hint: str) -> None:
    match = _QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        _fail(option, value, f"give a Kubernetes quantity: {hint}")
    suffix = match["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        amount = decimal.Decimal(match["number"] + suffix)
    else:
        amount = decimal.Decimal(match["number"]) * _SUFFIX_SCALE[suffix]
    if amount < minimum:
        _fail(option, value, f"it is only {amount.normalize():f}; give {hint}")


def _labels(config: JobConfig) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "disttrain",
        "app.kubernetes.io/instance": config.name,
    }
    if config.fixed_run_id is not None:
        labels[RUN_ID_LABEL] = config.fixed_run_id
    return labels


def _selector(config: JobConfig) -> dict[str, str]:
    return {key: _labels(config)[key]
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def _metadata(config: JobConfig) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": config.name}
    if config.namespace:
        metadata["namespace"] = config.namespace
    metadata["labels"] = _labels(config)
    return metadata


def _generated_env(config: JobConfig, evaluator: bool = False) -> list[tuple[str, Any]]:
    """The container env launch.k8s sets, as (name, value or valueFrom) pairs."""
    env: list[tuple[str, Any]] = [(ENV_RUN_ID, config.run_id_env), ("HOME", HOME)]
    if config.format in ATTEMPT_FORMATS:
        env.append((ENV_ATTEMPT, {"fieldRef": {
            "fieldPath": f"metadata.labels['{entrypoint.JOBSET_RESTART_LABEL}']"}}))
    if config.format != "tfjob" and evaluator:
        env.append((entrypoint.ENV_TASK_TYPE, EVALUATOR))
    if config.format != "tfjob":
        env += [
            (entrypoint.ENV_JOB_NAME, config.job_name),
            (entrypoint.ENV_SERVICE, config.name),
            (entrypoint.ENV_NAMESPACE, {"fieldRef": {"fieldPath": "metadata.namespace"}}),
            (entrypoint.ENV_NUM_WORKERS, str(config.workers)),
            (entrypoint.ENV_PORT, str(config.port)),
        ]
    if config.checkpoint_url:
        env.append((ENV_CHECKPOINT_URL, config.checkpoint_url))
    if config.gcp_key_secret:
        env.append((ENV_GOOGLE_CREDENTIALS, f"{GCP_KEY_DIR}/{GCP_KEY_FILE}"))
    return env


def _container(config: JobConfig, evaluator: bool = False) -> dict[str, Any]:
    tfjob = config.format == "tfjob"
    env = [{"name": name, "valueFrom": value} if isinstance(value, dict)
           else {"name": name, "value": value}
           for name, value in [*_generated_env(config, evaluator), *config.env]]
    limits: dict[str, Any] = {"cpu": config.cpu, "memory": config.memory}
    if config.gpus:
        limits[GPU_RESOURCE] = config.gpus
    container: dict[str, Any] = {
        # The Training Operator looks for a container named "tensorflow" and a port named
        # "tfjob-port" to build TF_CONFIG.
        "name": "tensorflow" if tfjob else config.replicated_job,
        "image": config.image,
        "command": ["python", "-m", "launch.entrypoint",
                    "--peer-timeout", str(config.peer_timeout), "--"],
        "args": list(config.command),
        "env": env,
        "ports": [{"name": "tfjob-port" if tfjob else "tf-grpc",
                   "containerPort": config.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": config.cpu, "memory": config.memory},
                      "limits": limits},
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True},
        "volumeMounts": [{"name": name, "mountPath": path} for name, path in SCRATCH_VOLUMES],
    }
    if config.gcp_key_secret:
        container["volumeMounts"].append({"name": "gcp-key", "mountPath": GCP_KEY_DIR,
                                          "readOnly": True})
    return container


def _pod_template(config: JobConfig, restart_policy: str | None,
                  subdomain: str | None, evaluator: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if subdomain:
        spec["subdomain"] = subdomain
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    else:
        spec["automountServiceAccountToken"] = False
    spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": POD_USER,
                               "runAsGroup": POD_USER,
                               "seccompProfile": {"type": "RuntimeDefault"}}
    # The pause container becomes PID 1, so the training process is not: a PID 1 without a
    # SIGTERM handler ignores SIGTERM, and every pod deletion would wait for SIGKILL.
    spec["shareProcessNamespace"] = True
    spec["terminationGracePeriodSeconds"] = config.termination_grace
    spec["containers"] = [_container(config, evaluator)]
    spec["volumes"] = [{"name": name, "emptyDir": {}} for name, _ in SCRATCH_VOLUMES]
    if config.gcp_key_secret:
        spec["volumes"].append({"name": "gcp-key", "secret": {
            "secretName": config.gcp_key_secret,
            "items": [{"key": GCP_KEY_FILE, "path": GCP_KEY_FILE}]}})
    labels = {**_labels(config), **(EVALUATOR_LABEL if evaluator else {})}
    return {"metadata": {"labels": labels}, "spec": spec}


def _evaluator_job_spec(config: JobConfig) -> dict[str, Any]:
    """The evaluator's Job: one pod, retried in place, never failing (see EVALUATOR_NOTE)."""
    return {
        "completionMode": "Indexed",
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": EVALUATOR_BACKOFF_LIMIT,
        "template": _pod_template(config, "OnFailure", None, evaluator=True),
    }


def _indexed_job_spec(config: JobConfig, backoff_limit: int,
                      subdomain: str | None) -> dict[str, Any]:
    return {
        "completionMode": "Indexed",
        "completions": config.workers,
        "parallelism": config.workers,
        "backoffLimit": backoff_limit,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": config.replicated_job, "operator": "In",
                             "values": [EXIT_CONFIG_ERROR]}},
            {"action": "Ignore",
             "onExitCodes": {"containerName": config.replicated_job, "operator": "In",
                             "values": [PREEMPTED_EXIT_CODE]}},
            {"action": "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "successPolicy": {"rules": [{"succeededIndexes": "0"}]},
        "template": _pod_template(config, "Never", subdomain),
    }


def _service(config: JobConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _selector(config),
            "ports": [{"name": "tf-grpc", "port": config.port, "targetPort": config.port,
                       "protocol": "TCP"}],
        },
    }


def _network_policy(config: JobConfig) -> dict[str, Any]:
    """Admits connections to the job's pods only to the gRPC port and only from the job's own
    pods (the evaluator's included: they all carry `_selector`'s labels); egress stays open
    (storage, DNS)."""
    pods = {"matchLabels": _selector(config)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(config),
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": pods}],
                         "ports": [{"protocol": "TCP", "port": config.port}]}],
        },
    }


def _job(config: JobConfig) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(config),
        "spec": _indexed_job_spec(config, config.max_restarts * config.workers, config.name),
    }


def _evaluator_job(config: JobConfig) -> dict[str, Any]:
    metadata = _metadata(config)
    metadata["name"] = f"{config.name}-{EVALUATOR}"
    metadata["labels"] = {**metadata["labels"], **EVALUATOR_LABEL}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": _evaluator_job_spec(config)}


def _jobset_spec(config: JobConfig) -> dict[str, Any]:
    """The spec of the JobSet (jobset), or of the JobSet template of the TrainingRuntime
    (trainjob), whose worker replicated job is then Trainer v2's trainer step."""
    evaluator = [{
        "name": EVALUATOR,
        "replicas": 1,
        "template": {"metadata": {"labels": {**_labels(config), **EVALUATOR_LABEL}},
                     "spec": _evaluator_job_spec(config)},
    }] if config.evaluator else []
    step = TRAINER_STEP_LABEL if config.format == "trainjob" else {}
    return {
        "network": {"enableDNSHostnames": True, "subdomain": config.name,
                    "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [
            config.replicated_job, *(job["name"] for job in evaluator)]},
        "failurePolicy": {
            "maxRestarts": config.max_restarts,
            "rules": [{"name": "configuration-error", "action": "FailJobSet",
                       "onJobFailureReasons": ["PodFailurePolicy"]}],
        },
        "replicatedJobs": [{
            "name": config.replicated_job,
            "replicas": 1,
            "template": {"metadata": {"labels": {**_labels(config), **step}},
                         "spec": _indexed_job_spec(config, 0, None)},
        }, *evaluator],
    }


def _jobset(config: JobConfig) -> dict[str, Any]:
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": _metadata(config), "spec": _jobset_spec(config)}


def _training_runtime(config: JobConfig) -> dict[str, Any]:
    """Trainer v2's runtime: numNodes (no framework policy, so Trainer v2 injects no
    environment) and the JobSet spec."""
    return {"apiVersion": TRAINER_API, "kind": "TrainingRuntime", "metadata": _metadata(config),
            "spec": {"mlPolicy": {"numNodes": config.workers},
                     "template": {"spec": _jobset_spec(config)}}}


def _trainjob(config: JobConfig) -> dict[str, Any]:
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": _metadata(config),
            "spec": {"runtimeRef": {"apiGroup": TRAINER_API_GROUP, "kind": "TrainingRuntime",
                                    "name": config.name},
                     "trainer": {"numNodes": config.workers}}}


def _tfjob(config: JobConfig) -> dict[str, Any]:
    replicas = {"Worker": {
        "replicas": config.workers,
        "restartPolicy": "OnFailure",
        "template": _pod_template(config, None, None),
    }}
    if config.evaluator:
        replicas["Evaluator"] = {"replicas": 1, "restartPolicy": "OnFailure",
                                 "template": _pod_template(config, None, None, evaluator=True)}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": _metadata(config),
        "spec": {
            "runPolicy": {"backoffLimit": config.max_restarts * config.workers,
                          "cleanPodPolicy": "None" if config.evaluator else "Running"},
            "tfReplicaSpecs": replicas,
        },
    }


def manifests(config: JobConfig) -> list[dict[str, Any]]:
    """The Kubernetes objects for `config`, validated first, in `kubectl apply` order: the
    NetworkPolicy first, so that it exists before any pod listens, and a TrainJob's runtime
    before the TrainJob (Trainer v2's webhook rejects a TrainJob whose runtime is missing)."""
    config.validate()
    if config.format == "job":
        return [_network_policy(config), _service(config), _job(config),
                *([_evaluator_job(config)] if config.evaluator else [])]
    if config.format == "jobset":
        return [_network_policy(config), _jobset(config)]
    if config.format == "trainjob":
        return [_network_policy(config), _training_runtime(config), _trainjob(config)]
    return [_network_policy(config), _tfjob(config)]


# Strings written plain; every other string is double-quoted. Stricter than YAML needs: no
# word that any YAML 1.1 parser (Kubernetes's included) reads as a bool or null stays plain.
_PLAIN = re.compile(r"(?:[A-Za-z_/$]|-[-A-Za-z])[A-Za-z0-9_./:=@+$()-]*")
_YAML_KEYWORDS = {"y", "yes", "n", "no", "true", "false", "on", "off", "null", "~"}
# yamllint's default line length. It lets a longer line through only when it is a single word
# (a list item `- word` counts as one), so a long `key: word` is folded onto a line of its own.
_LINE_LIMIT = 80


class _ManifestDumper(yaml.SafeDumper):
    """PyYAML's safe dumper in the house style of the manifests: lists indented under their
    key, double quotes only, a long single-word mapping value folded onto its own line."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        value = self.event.value
        if (self.mapping_context and not self.simple_key_context and not self.flow_level
                and self.analysis.allow_block and value and value.isprintable() and not any(c.isspace() for c in value)):
            width = len(value) + (0 if style == "" else 2 + value.count('"') + value.count("\\"))
            if self.column + 1 + width > _LINE_LIMIT:
                return ">"
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    plain = (_PLAIN.fullmatch(value) and not value.endswith(":")
             and value.lower() not in _YAML_KEYWORDS)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain else '"')


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml(documents: Sequence[dict[str, Any]]) -> str:
    """YAML for `documents` (PyYAML): block style, strings quoted only where needed.

    Example:

    >>> print(to_yaml([{"kind": "Service", "spec": {"ports": [{"port": 2222}]}}]), end="")
    # Generated by `python -m launch.k8s`; regenerate instead of editing.
    ---
    kind: Service
    spec:
      ports:
        - port: 2222
    """
    body = yaml.dump_all(documents, Dumper=_ManifestDumper, explicit_start=True,
                         sort_keys=False, default_flow_style=False)
    return f"# Generated by `python -m launch.k8s`; regenerate instead of editing.\n{body}"


def _parse_env(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail("--env", item, "write NAME=VALUE, e.g. --env TF_CPP_MIN_LOG_LEVEL=2")
        pairs.append((name, value))
    return tuple(pairs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.k8s",
        description="Print (or write) Kubernetes manifests that run a command on N workers.",
        usage="%(prog)s --name NAME --workers N --image IMAGE [options] -- cmd [args ...]",
        epilog=f"{RUN_ID_NOTE}\n\n{TFJOB_RESTART_POLICY_NOTE}\n\n{EVALUATOR_NOTE}\n\n"
               f"{TRAINJOB_NOTE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--name", required=True, help="job name; pods are <name>-<i> (DNS-1035 label)")
    add("--workers", required=True, type=int, help="number of workers (pods), at least 1")
    add("--image", required=True, help="container image with disttrain installed")
    add("--namespace", help="namespace of every object (default: kubectl's current one)")
    add("--cpu", default="2", help="CPU request and limit per worker (default 2)")
    add("--memory", default="4Gi", help="memory request and limit per worker (default 4Gi)")
    add("--gpus", type=int, default=0, help=f"{GPU_RESOURCE} per worker (default 0)")
    add("--port", type=int, default=2222, help="TensorFlow gRPC port (default 2222)")
    add("--checkpoint-url", help=f"sets {ENV_CHECKPOINT_URL} (use '$({ENV_CHECKPOINT_URL})' "
                                 "in the command)")
    add("--service-account", help="Kubernetes ServiceAccount of the pods (Workload Identity); "
                                  "its token is mounted (without it, no token is)")
    add("--gcp-key-secret", help=f"Secret holding a Google service account key as "
                                 f"'{GCP_KEY_FILE}'; mounted, {ENV_GOOGLE_CREDENTIALS} set")
    add("--env", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
        help="extra environment variables (repeatable)")
    add("--run-id", help=f"{ENV_RUN_ID} of every worker, used as is: you keep it unique "
                         "(default: one per job instance, see 'run id' below)")
    add("--max-restarts", type=int, default=3,
        help="restarts of the worker group before the job fails (default 3)")
    add("--peer-timeout", type=int, default=int(entrypoint.DEFAULT_PEER_TIMEOUT),
        help="seconds each pod waits to meet its peers: long enough for the slowest pod to be "
             f"scheduled and pull the image (default {entrypoint.DEFAULT_PEER_TIMEOUT:g})")
    add("--termination-grace", type=int, default=DEFAULT_TERMINATION_GRACE,
        help="seconds between a pod's SIGTERM and SIGKILL (terminationGracePeriodSeconds): "
             "BackupAndRestore needs them to finish the current step and write a backup "
             f"(default {DEFAULT_TERMINATION_GRACE})")
    add("--format", choices=FORMATS, default="job", help="what to emit (default job)")
    add("--evaluator", action="store_true",
        help="add an evaluator task: one pod outside training running the same command "
             "(see 'evaluator' below)")
    add("--output", type=Path, help="write <DIR>/<name>.yaml instead of printing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options, command = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(options)
    try:
        config = JobConfig(
            name=args.name, workers=args.workers, image=args.image,
            command=tuple(command or ()), namespace=args.namespace, cpu=args.cpu,
            memory=args.memory, gpus=args.gpus, port=args.port,
            checkpoint_url=args.checkpoint_url, service_account=args.service_account,
            gcp_key_secret=args.gcp_key_secret, env=_parse_env(args.env), run_id=args.run_id,
            max_restarts=args.max_restarts, peer_timeout=args.peer_timeout,
            termination_grace=args.termination_grace, format=args.format,
            evaluator=args.evaluator,
        )
        text = to_yaml(manifests(config))
    except ManifestConfigError as e:
        parser.error(str(e))
    if config.run_id is None and config.fixed_run_id is not None:
        why = ("TFJob pods carry no identifier of their TFJob" if config.format == "tfjob" else
               "the training Job and the evaluator's Job have different UIDs")
        print(f"launch.k8s: note: {why}, so this "
              f"manifest has a run id of its own, {config.tfjob_run_id}: applying it again, "
              f"even after deleting the {'TFJob' if config.format == 'tfjob' else 'Jobs'}, "
              "continues that run. Generate a new manifest (or "
              "pass a new --run-id) for a new run.", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{config.name}.yaml"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
