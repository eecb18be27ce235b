"""TF_CONFIG exactly as managed platforms write it, for given addresses.

Every key but the addresses is as the platform writes it (sources: README,
"Where it runs"). Each function returns one TF_CONFIG dict per task: the
training tasks in rank order (the platform's chief first), then the evaluator
when one is given.
"""

from __future__ import annotations

from typing import Any

VERTEX_JOB_SPEC = {
    "worker_pool_specs": [
        {"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": "1",
         "container_spec": {"image_uri": "us-docker.pkg.dev/p/r/trainer:1", "args": ["--epochs=2"]}},
        {"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": "1",
         "container_spec": {"image_uri": "us-docker.pkg.dev/p/r/trainer:1", "args": ["--epochs=2"]}},
    ],
    "base_output_directory": {"output_uri_prefix": "gs://bucket/output"},
}


def vertex_ai(addresses: list[str], evaluator: str | None = None,
              chief_name: str = "chief") -> list[dict[str, Any]]:
    """Vertex AI custom training: pool 0 is the chief, pool 1 the workers, pool 3 the
    evaluator (never in `cluster`); `chief_name="master"` for older jobs."""
    cluster = {chief_name: addresses[:1], "worker": addresses[1:]}
    tasks = [(chief_name, 0)] + [("worker", i) for i in range(len(addresses) - 1)]
    if evaluator:
        tasks.append(("evaluator", 0))
    return [{"cluster": cluster, "environment": "cloud", "job": VERTEX_JOB_SPEC,
             "task": {"type": t, "index": i, "trial": "1", "cloud": f"{t}-replica-{i}"}}
            for t, i in tasks]


def tfjob(addresses: list[str], evaluator: str | None = None,
          chief_name: str = "chief") -> list[dict[str, Any]]:
    """Kubeflow TFJob v1: Chief (or Master) and Worker replicas; the Evaluator is listed
    in `cluster` too."""
    cluster = {chief_name: addresses[:1], "worker": addresses[1:]}
    tasks = [(chief_name, 0)] + [("worker", i) for i in range(len(addresses) - 1)]
    if evaluator:
        cluster["evaluator"] = [evaluator]
        tasks.append(("evaluator", 0))
    return [{"cluster": cluster, "task": {"type": t, "index": i}, "environment": "cloud"}
            for t, i in tasks]


def sagemaker(addresses: list[str]) -> list[dict[str, Any]]:
    """SageMaker's MultiWorkerMirroredStrategy distribution: workers only, `algo-N` hosts."""
    return [{"cluster": {"worker": addresses}, "environment": "cloud",
             "task": {"index": i, "type": "worker"}} for i in range(len(addresses))]


def ray_train(addresses: list[str]) -> list[dict[str, Any]]:
    """Ray Train's TensorflowTrainer: a plain worker list."""
    return [{"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
            for i in range(len(addresses))]


SHAPES = {
    "vertex_ai": vertex_ai,
    "vertex_ai_master": lambda a, e=None: vertex_ai(a, e, chief_name="master"),
    "tfjob": tfjob,
    "tfjob_master": lambda a, e=None: tfjob(a, e, chief_name="master"),
    "sagemaker": lambda a, e=None: sagemaker(a),
    "ray_train": lambda a, e=None: ray_train(a),
}
