"""Simulated Kubernetes pods for tests. The pods themselves (`PodNetwork`, one network namespace
per pod on a bridge) live in `workloads.pod_network`, shared with the benchmarks; this module
adds `run_pods` (a generated manifest's pods started as Kubernetes would) and `wait_for` (fails
the test on a timeout). Needs root and `ip netns`; `workloads.pod_network.netns_unavailable()`
says why not."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from launch import k8s
from workloads import k8s_pods
from workloads.pod_network import PodNetwork, kubernetes_env_here, reap


def wait_for(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    outputs = [log.read_text() for log in logs]
    if any(p.returncode is None for p in procs):
        reap(procs)
        pytest.fail("timed out:\n" + "\n---\n".join(outputs))
    return outputs


def run_pods(network: PodNetwork, config: k8s.JobConfig, order: list[int], delay: float,
              tmp_path: Path, timeout: float, start: set[int] | None = None) -> list[str]:
    """Starts the pods of `config`'s manifest in `order`, `delay` seconds apart, as Kubernetes
    would (names published as each starts); returns each pod's output once all exited."""
    namespace = config.namespace or "default"
    container = k8s_pods.pod_spec(k8s.manifests(config))["containers"][0]
    logs = [tmp_path / f"pod{i}.log" for i in range(config.workers)]
    for i in order:
        if start is not None and i not in start:
            continue
        hostname = config.hostname(i)
        network.publish(i, k8s_pods.dns_names(hostname, config.name, namespace))
        env = kubernetes_env_here(container, i, hostname, namespace, tmp_path)
        argv = k8s_pods.pod_argv(container, env)
        assert argv[:3] == ["python", "-m", "launch.entrypoint"]
        network.start(i, argv[3:], env, logs[i])
        if i != order[-1]:
            time.sleep(delay)
    started = [logs[i] for i in order if start is None or i in start]
    return wait_for(network.procs, started, timeout)
