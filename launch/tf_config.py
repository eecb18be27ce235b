"""The tasks of a cluster and their TF_CONFIG; used by every launcher and the pod entrypoint.

Each TF_CONFIG is built by `disttrain.cluster.build_tf_config`, the one place that
knows the schema, and checked by `disttrain.cluster.Cluster`, so a launcher can
never hand a worker a TF_CONFIG that disttrain itself would reject.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from disttrain.cluster import Cluster, build_tf_config, parse_address
from disttrain.errors import ClusterConfigError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a cluster and the TF_CONFIG it runs with."""

    task_type: str
    task_index: int
    tf_config: dict[str, Any]

    @property
    def cluster(self) -> Cluster:
        return Cluster.from_tf_config(self.tf_config)

    @property
    def label(self) -> str:
        return self.cluster.label

    def to_json(self) -> str:
        return json.dumps(self.tf_config, separators=(",", ":"))


def cluster_specs(
    workers: Sequence[str], chief: str | None = None, evaluator: bool = False
) -> list[TaskSpec]:
    """TaskSpecs for every task of a cluster: chief first, then workers, then evaluator."""
    specs: list[TaskSpec] = []
    if chief is not None:
        specs.append(TaskSpec("chief", 0, build_tf_config(workers, "chief", 0, chief)))
    for i in range(len(workers)):
        specs.append(TaskSpec("worker", i, build_tf_config(workers, "worker", i, chief)))
    if evaluator:
        specs.append(TaskSpec("evaluator", 0, build_tf_config(workers, "evaluator", 0, chief)))
    return specs


def local_addresses(ports: Sequence[int], host: str = "127.0.0.1") -> list[str]:
    """`host:port` strings for tasks on one machine."""
    addresses = [f"{host}:{p}" for p in ports]
    for i, a in enumerate(addresses):
        parse_address(a, f"ports[{i}]")
    if len(set(ports)) != len(ports):
        raise ClusterConfigError(
            f"ports={list(ports)!r} contains duplicates. Fix: give every task its own port."
        )
    return addresses


def indexed_job_addresses(
    job_name: str, service: str, num_workers: int, port: int, namespace: str | None = None
) -> list[str]:
    """Addresses of the pods of a Kubernetes Indexed Job behind a headless Service.

    Pod `i` resolves as `<job>-<i>.<service>[.<namespace>.svc]`.
    """
    if num_workers < 1:
        raise ClusterConfigError(
            f"num_workers={num_workers!r} must be at least 1. Fix: pass --workers 1 or more."
        )
    suffix = f".{namespace}.svc" if namespace else ""
    addresses = [f"{job_name}-{i}.{service}{suffix}:{port}" for i in range(num_workers)]
    for i, a in enumerate(addresses):
        parse_address(a, f"pod[{i}]")
    return addresses
