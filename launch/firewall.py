"""Keeps a local job's TensorFlow ports closed to other hosts.

TensorFlow's gRPC server has no authentication (whoever connects to a worker's port can run
graph operations in it) and binds every interface whatever TF_CONFIG says: TensorFlow 2.21
listens on `0.0.0.0:PORT`, which gRPC widens to the dual-stack `[::]:PORT` (`ss -ltn` shows
`*:PORT`); its ServerDef has no bind address. So `launch.local` adds, for the job's ports, an
iptables and an ip6tables rule that resets every TCP connection not arriving through the
loopback interface. Tasks on this machine still reach each other under any address of the
machine (the kernel routes a connection to a local address through loopback), and outbound
traffic (gs://, s3://, dataset downloads) is untouched.

The rules live in a chain of their own (`DISTTRAIN-<launcher pid>`), jumped to from INPUT;
each attempt replaces the chain's rules with its ports, and the launcher deletes the chain when
it ends. If the launcher is killed, its watchdog (`launch/watchdog.py`) deletes it. If both
are killed at once, the next launcher deletes the chain: the jump's comment names the PID
namespace, and a chain whose launcher pid is gone from that namespace is stale.

Example:

```
guard = LoopbackOnly.install(watchdog)   # FirewallUnavailable: not root, no iptables, ...
guard.admit_only_loopback([2222, 2223])
...
guard.remove()
```
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from disttrain.errors import FirewallUnavailable
from launch.procs import Watchdog

CHAIN_PREFIX = "DISTTRAIN-"
EXPOSED = ("the workers' TensorFlow ports accept connections from other hosts: TensorFlow "
           "listens on every interface, whatever --host says, and anyone who can connect can "
           "run code in the workers")
FIX = ("run the launcher as root with iptables installed (it then admits only this machine "
       "to those ports); or run it in a network namespace with loopback only: `unshare "
       "--user --map-root-user --net sh -c 'ip link set lo up && python -m launch.local ...'` "
       "(no outbound network, so no gs:// checkpoints or downloads); or close the ports "
       "with a firewall of your own. --listen-all says the ports are meant to be open")
_COMMAND_TIMEOUT_S = 30


def _tools() -> tuple[str, ...]:
    """iptables, and ip6tables where this machine has IPv6 (the server's socket is dual-stack)."""
    return ("iptables", "ip6tables") if os.path.exists("/proc/net/if_inet6") else ("iptables",)


class LoopbackOnly:
    """An iptables chain that resets connections from other hosts to a set of TCP ports.

    Create it with `install`; `admit_only_loopback` sets the ports (each attempt of a job has
    its own); `remove` deletes the chain.
    """

    def __init__(self, tools: Sequence[str], chain: str, watchdog: Watchdog | None):
        self._tools = tuple(tools)
        self.chain = chain
        self._watchdog = watchdog

    @classmethod
    def install(cls, watchdog: Watchdog | None = None) -> "LoopbackOnly":
        """Creates this launcher's chain, empty, jumped to from INPUT.

        Args:
            watchdog: a `launch.procs.Watchdog` that deletes the chain if the launcher dies,
                or None.

        Raises:
            FirewallUnavailable: not root, iptables missing, or iptables refused.
        """
        if os.geteuid() != 0:
            raise FirewallUnavailable("the launcher is not root, so it cannot add firewall rules")
        tools = _tools()
        missing = [tool for tool in tools if shutil.which(tool) is None]
        if missing:
            raise FirewallUnavailable(f"{' and '.join(missing)} not found on PATH")
        guard = cls(tools, f"{CHAIN_PREFIX}{os.getpid()}", watchdog)
        try:
            for tool in tools:
                _remove_stale(tool)
                guard._run(tool, "-N", guard.chain)
                guard._run(tool, "-I", "INPUT", "-j", guard.chain,
                           "-m", "comment", "--comment", _owner_comment())
        except FirewallUnavailable:
            guard.remove()
            raise
        if watchdog is not None:
            watchdog.on_death(guard._removal())
        return guard

    def admit_only_loopback(self, ports: Sequence[int]) -> None:
        """Replaces the chain's rules: TCP connections to `ports` from outside loopback get a
        reset. Raises FirewallUnavailable if iptables refuses."""
        for tool in self._tools:
            self._run(tool, "-F", self.chain)
            for port in ports:
                self._run(tool, "-A", self.chain, "!", "-i", "lo", "-p", "tcp",
                          "--dport", str(port), "-j", "REJECT", "--reject-with", "tcp-reset")

    def remove(self) -> None:
        """Deletes the chain and its jump (whatever of them exists); never raises."""
        _run_quietly(self._removal())
        if self._watchdog is not None:
            self._watchdog.on_death([])

    def _removal(self) -> list[list[str]]:
        return [argv for tool in self._tools for argv in _chain_removal(tool, self.chain)]

    def _run(self, tool: str, *args: str) -> None:
        command = f"`{tool} {' '.join(args)}`"
        try:
            done = subprocess.run([tool, "-w", *args], capture_output=True, text=True,
                                  timeout=_COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FirewallUnavailable(f"{command} failed: {e}") from e
        if done.returncode != 0:
            raise FirewallUnavailable(
                f"{command} failed: {done.stderr.strip() or f'exit {done.returncode}'}")


def _owner_comment() -> str:
    """Names this PID namespace, so that launchers of another one leave our chain alone."""
    return f"disttrain pidns {os.stat('/proc/self/ns/pid').st_ino}"


def _chain_removal(tool: str, chain: str) -> list[list[str]]:
    return [[tool, "-w", "-D", "INPUT", "-j", chain, "-m", "comment", "--comment",
             _owner_comment()], [tool, "-w", "-F", chain], [tool, "-w", "-X", chain]]


def _remove_stale(tool: str) -> None:
    """Deletes the chains of launchers of this PID namespace that are gone (killed together
    with their watchdog); a pid reused since keeps its chain (ports stay closed, not open)."""
    try:
        listed = subprocess.run([tool, "-w", "-S", "INPUT"], capture_output=True, text=True,
                                timeout=_COMMAND_TIMEOUT_S, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    jump = re.compile(rf'-A INPUT -m comment --comment "?{re.escape(_owner_comment())}"? '
                      rf'-j {CHAIN_PREFIX}(\d+)')
    for line in listed.splitlines():
        found = jump.fullmatch(line.strip())
        if found is None or os.path.exists(f"/proc/{found[1]}"):
            continue
        _run_quietly(_chain_removal(tool, f"{CHAIN_PREFIX}{found[1]}"))


def _run_quietly(commands: list[list[str]]) -> None:
    """Runs each command, ignoring how it ends (what it deletes may not exist)."""
    for argv in commands:
        try:
            subprocess.run(argv, capture_output=True, timeout=_COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
