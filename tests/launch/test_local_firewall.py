"""`launch.local` keeps other hosts off the workers' TensorFlow ports (launch/firewall.py).

TensorFlow's gRPC server listens on every interface whatever TF_CONFIG says, and has no
authentication. Here the launcher runs in a network namespace of its own (the "machine"),
linked by a veth pair to a second one (a host on its LAN, IPv4 and IPv6); every probe is a
TCP connect from the LAN host to the machine's address. Without the firewall the probes
connect (measured with TensorFlow 2.21 before launch/firewall.py existed). The namespaces
keep the rules off this machine's own firewall. Needs root, `ip` and iptables; skipped,
saying why, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from launch.firewall import CHAIN_PREFIX
from workloads.pod_network import delete_netns, netns_unavailable
from tests.launch.test_launch_local import PY, launch, run, watchdog_pid, worker  # noqa: F401

MACHINE, LAN = ("198.19.0.1", "fd19::1"), ("198.19.0.2", "fd19::2")

_PROBE = """
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=3).close()
        results.append("connected")
    except OSError as e:
        results.append(type(e).__name__)
print(json.dumps(results))
"""


class Lan:
    """A machine (network namespace) and a LAN host (another), linked by a veth pair."""

    def __init__(self) -> None:
        tag = f"dtfw-{os.getpid()}"
        self.machine, self.host = f"{tag}-m", f"{tag}-h"

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def __enter__(self) -> "Lan":
        try:
            for ns in (self.machine, self.host):
                self._ip("netns", "add", ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", self.machine, "link", "add", "eth0", "type", "veth", "peer", "name",
                     "eth0", "netns", self.host)
            for ns, (v4, v6) in ((self.machine, MACHINE), (self.host, LAN)):
                self._ip("-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
                self._ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
                self._ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for ns in (self.machine, self.host):
            delete_netns(ns)

    @property
    def on_machine(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.machine)

    def probe(self, ns: str, targets: list[tuple[str, int]]) -> list[str]:
        """`connected` or the error's type name for each (host, port), connecting from `ns`."""
        done = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", _PROBE, json.dumps(targets)],
                              capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)

    def from_lan(self, ports: list[int]) -> list[str]:
        return self.probe(self.host, [(a, p) for p in ports for a in MACHINE])

    def chains(self) -> list[str]:
        """The launchers' chains in the machine's iptables and ip6tables."""
        found = []
        for tool in ("iptables", "ip6tables"):
            listed = subprocess.run([*self.on_machine, tool, "-w", "-S"], capture_output=True,
                                    text=True, timeout=30, check=True).stdout
            found += [f"{tool}:{line.split()[1]}" for line in listed.splitlines()
                      if line.startswith(f"-N {CHAIN_PREFIX}")]
        return found


@pytest.fixture
def lan():
    reason = netns_unavailable()
    if reason is None and not (shutil.which("iptables") and shutil.which("ip6tables")):
        reason = "the firewall needs iptables and ip6tables"
    if reason:
        pytest.skip(reason)
    with Lan() as network:
        yield network


def _ports(lines: list[str]) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in lines]


def test_ports_are_closed_to_other_hosts_until_a_killed_launchers_watchdog_opens_them(
        launch, lan):
    launcher = launch("--workers", "2", *worker("listen"), wrap=lan.on_machine)
    ports = _ports(launcher.wait_for(r"listening \d+", count=2))
    assert lan.from_lan(ports) == ["ConnectionRefusedError"] * 4
    assert lan.probe(lan.machine, [(a, p) for p in ports for a in ("127.0.0.1", *MACHINE)]
                     ) == ["connected"] * 6
    assert lan.chains() == [f"{tool}:{CHAIN_PREFIX}{launcher.proc.pid}"
                            for tool in ("iptables", "ip6tables")]
    launcher.proc.kill()
    deadline = time.monotonic() + 10
    while lan.chains() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lan.chains() == []


def test_rules_of_a_launcher_killed_with_its_watchdog_are_removed_by_the_next_launcher(
        launch, lan):
    first = launch("--workers", "1", *worker("listen"), wrap=lan.on_machine)
    first.wait_for(r"listening \d+")
    os.kill(watchdog_pid(launch.marker), signal.SIGKILL)
    first.proc.kill()
    first.proc.wait()
    assert lan.chains() == [f"{tool}:{CHAIN_PREFIX}{first.proc.pid}"
                            for tool in ("iptables", "ip6tables")], "nobody removed them"
    second = launch("--workers", "1", *worker("listen"), wrap=lan.on_machine)
    second.wait_for(r"listening \d+")
    assert lan.chains() == [f"{tool}:{CHAIN_PREFIX}{second.proc.pid}"
                            for tool in ("iptables", "ip6tables")]
    second.proc.send_signal(signal.SIGTERM)
    second.finish()
    assert lan.chains() == []


def test_listen_all_leaves_the_ports_open_and_says_so(launch, lan):
    launcher = launch("--workers", "2", "--listen-all", *worker("listen"), wrap=lan.on_machine)
    ports = _ports(launcher.wait_for(r"listening \d+", count=2))
    assert lan.from_lan(ports) == ["connected"] * 4
    assert lan.chains() == []
    launcher.proc.send_signal(signal.SIGTERM)
    code, _, err, _ = launcher.finish()
    assert code == 128 + signal.SIGTERM
    assert err.count("--listen-all: the workers' ports accept connections from other hosts") == 1


def test_without_a_firewall_every_run_says_so_once_with_the_fix(launch):
    code, _, err, _ = run(launch, "--workers", "2", "--max-restarts", "1",
                          *worker("fail-attempt0", "3"), env={"PATH": str(Path(PY).parent)})
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "ports accept connections" in line]
    assert len(warnings) == 1, err
    assert "not found on PATH" in warnings[0] or "not root" in warnings[0]
    assert "Fix: run the launcher as root with iptables installed" in warnings[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_tensorflow_workers_are_refused_from_another_host_and_still_train(
        launch, lan, tmp_path):
    launcher = launch("--workers", "2", "--", PY, "-m", "tests.launch.firewall_workload",
                      str(tmp_path), wrap=lan.on_machine, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.monotonic() + 200
    files = [tmp_path / "w0.port", tmp_path / "w1.port"]
    while not all(f.exists() for f in files):
        assert launcher.proc.poll() is None, launcher.finish()
        assert time.monotonic() < deadline, "the workers did not start their servers"
        time.sleep(0.2)
    ports = [int(f.read_text()) for f in files]
    lan_results = lan.from_lan(ports)
    local_results = lan.probe(lan.machine, [("127.0.0.1", p) for p in ports])
    (tmp_path / "go").touch()
    code, out, err, _ = launcher.finish(timeout=240)
    assert code == 0, err
    assert lan_results == ["ConnectionRefusedError"] * 4
    assert local_results == ["connected"] * 2
    assert "[w0] TRAINED" in out and "[w1] TRAINED" in out
    assert lan.chains() == []
    assert "ports accept connections" not in err
