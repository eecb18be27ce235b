"""Simulated Kubernetes pods on this machine: one network namespace per pod on a bridge, each
with its own /etc/hosts, running the pod's `launch.entrypoint` command with the environment
Kubernetes would give it (tests/support/k8s_pods.py). Needs root and `ip netns`;
`netns_unavailable()` says why not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launch import k8s
from tests.support import REPO_ROOT, k8s_pods

SUBNET = "198.18.0"  # RFC 2544 benchmarking range, used only inside the test namespaces.


def entrypoint_process(args: list[str], env: dict[str, str], log: Path, netns: str | None = None,
                ) -> subprocess.Popen:
    command = [sys.executable, "-m", "launch.entrypoint", *args]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def reap(procs: list[subprocess.Popen]) -> None:
    """Kills each process group still running (by its leader's pid) and waits for it."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


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


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "simulated pods need root for network namespaces"
    if shutil.which("ip") is None:
        return "simulated pods need `ip` (iproute2) for network namespaces"
    probe = f"dt5-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` does not work here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


class PodNetwork:
    """One network namespace per pod, linked by a bridge in a namespace of its own, each with
    its own /etc/hosts (`/etc/netns/<ns>/hosts`) and a resolver that answers nothing else."""

    def __init__(self, count: int):
        tag = f"dt5-{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.pods = [f"{tag}-p{i}" for i in range(count)]
        self.procs: list[subprocess.Popen] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def __enter__(self) -> "PodNetwork":
        try:
            self._ip("netns", "add", self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
            for i, pod in enumerate(self.pods):
                self._ip("netns", "add", pod)
                etc = Path("/etc/netns", pod)
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text("127.0.0.1 localhost\n")
                (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n"
                                                 "options timeout:1 attempts:1\n")
                self._ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth",
                         "peer", "name", "eth0", "netns", pod)
                self._ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                self._ip("-n", pod, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
                self._ip("-n", pod, "link", "set", "eth0", "up")
                self._ip("-n", pod, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def publish(self, index: int, names: list[str]) -> None:
        """Makes pod `index`'s names resolve in every pod, appending in place: the hosts files
        are bind-mounted into running processes, so a new file would go unseen."""
        for pod in self.pods:
            with open(Path("/etc/netns", pod, "hosts"), "a") as hosts:
                hosts.write(f"{SUBNET}.{index + 1} {' '.join(names)}\n")

    def start(self, index: int, args: list[str], env: dict[str, str], log: Path) -> None:
        self.procs.append(entrypoint_process(args, env, log, netns=self.pods[index]))

    def __exit__(self, *exc_info: Any) -> None:
        reap(self.procs)
        for ns in [*self.pods, self.switch]:
            delete_netns(ns)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)


def delete_netns(ns: str) -> None:
    """SIGKILLs every process in network namespace `ns`, then deletes it."""
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in listed.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def kubernetes_env_here(container: dict, index: int, hostname: str, namespace: str,
                    home: Path, labels: dict[str, str] | None = None) -> dict[str, str]:
    """What Kubernetes gives the container (tests/support/k8s_pods.py), plus PATH (which an image
    would set) for a process on this machine, and `home` for the manifest's HOME (an emptyDir
    volume in the pod)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            **k8s_pods.kubernetes_env(container, index, hostname, namespace, labels),
            "HOME": str(home)}


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
