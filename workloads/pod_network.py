"""Simulated Kubernetes pods on this machine: one network namespace per pod on a bridge, each
with its own /etc/hosts, running the pod's `launch.entrypoint` command with the environment
Kubernetes would give it (`workloads.k8s_pods`). Shared by the simulated-pod tests
(tests/support/pod_network.py adds their pytest helpers) and the link-down fault of
`python -m benchmarks.faults`. Needs root and `ip netns`; `netns_unavailable()` says why not.

Example:

```
with PodNetwork(2) as network:
    network.publish(0, ["demo-0.demo.default.svc"])
    network.start(0, ["--", "python", "-c", "print('hi')"], env, Path("pod0.log"))
    network.link_down(0)  # pod 0's cable pulled: its packets and its peers' are dropped
```
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from workloads import k8s_pods

SUBNET = "198.18.0"  # RFC 2544 benchmarking range, used only inside the pods' namespaces.
# The repository root: the pods' processes start here.
REPO_ROOT = Path(__file__).resolve().parents[1]


def entrypoint_process(args: list[str], env: dict[str, str], log: Path, netns: str | None = None,
                       ) -> subprocess.Popen:
    """Starts `python -m launch.entrypoint ARGS` (in network namespace `netns`, if given) in a
    session of its own, its stdout and stderr to `log`."""
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


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
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
    its own /etc/hosts (`/etc/netns/<ns>/hosts`) and a resolver that answers nothing else.

    Pod `i` is `<tag>-p<i>` with address `SUBNET.<i + 1>` on its `eth0`, a veth whose other
    end, `p<i>`, is a port of the bridge `br0` in `<tag>-sw`. Leaving the `with` block kills
    every process started in the pods and deletes every namespace (their links and the bridge
    go with them) and /etc/netns entry.

    Args:
        count: the number of pods.
        tag: the prefix of the namespaces' names (default `dt5-<pid>`); unique per live network.
    """

    def __init__(self, count: int, tag: str | None = None):
        tag = tag or f"dt5-{os.getpid()}"
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
        """Starts `python -m launch.entrypoint ARGS` in pod `index` (`entrypoint_process`)."""
        self.procs.append(entrypoint_process(args, env, log, netns=self.pods[index]))

    def link_down(self, index: int) -> None:
        """Sets pod `index`'s link down from the bridge's side (its cable pulled): its `eth0`
        loses carrier, so whatever it sends and whatever is sent to it is dropped, while the
        pod's own addresses and routes stay as they were."""
        self._ip("-n", self.switch, "link", "set", f"p{index}", "down")

    def __exit__(self, *exc_info: Any) -> None:
        reap(self.procs)
        for ns in [*self.pods, self.switch]:
            delete_netns(ns)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)


def leftovers(tag: str) -> list[str]:
    """What a `PodNetwork(tag=tag)` left on this machine: network namespaces (with them their
    veth links and bridge) and /etc/netns entries whose names start with `tag`."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    left = [f"network namespace {n}" for n in names if n.startswith(tag)]
    etc = Path("/etc/netns")
    if etc.is_dir():
        left += [f"{etc / n}" for n in sorted(os.listdir(etc)) if n.startswith(tag)]
    return left


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
                        home: Path, labels: dict[str, str] | None = None,
                        attempt: int = 0) -> dict[str, str]:
    """What Kubernetes gives the container (`workloads.k8s_pods`), plus PATH (which an image
    would set) for a process on this machine, and `home` for the manifest's HOME (an emptyDir
    volume in the pod)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            **k8s_pods.kubernetes_env(container, index, hostname, namespace, labels, attempt),
            "HOME": str(home)}
