"""A real, private Slurm for the tests: munged, slurmctld and slurmd on this machine.

Debian's `slurm-wlm` and `munge` (installed with apt-get when missing), started directly (no
systemd), everything under one temporary directory: a private munge key and socket, a private
`slurm.conf` (`SLURM_CONF`), free ports, state and spool directories. Several test sessions on
one machine therefore never meet each other's daemons. Bring-up takes under a second once the
packages are installed. Pitfalls met (ARCHITECTURE.md, "Facts measured ... 2026-12-06"): munged
runs as the `munge` user and its socket directory must be 755 and owned by it; no cgroups here
(`proctrack/linuxproc`, `task/none`); `MailProg=/bin/true`. A requeued job may start again only
`cred_expire` + 1 seconds later (measured: 150 s with the default 120); 5 here, the least.

    with LocalSlurm(tmp_dir) as slurm:
        slurm.run(["srun", "-n", "2", "hostname"])

Several nodes: one `SlurmNode` per slurmd, each started with its own command prefix (e.g.
`ip netns exec <ns>`, a network namespace with its own address: tests/launch/slurm/test_slurm_nodes.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
# Ports Slurm reserves for steps started with `srun --resv-ports` (MpiParams=ports=...).
RESERVED_PORTS = (23100, 23199)


class SlurmNode(NamedTuple):
    """A slurmd: its node name, the address slurmctld reaches it at, and the command prefix
    that runs a process on it (`("ip", "netns", "exec", ns)`; empty: this machine)."""

    name: str
    addr: str
    prefix: tuple[str, ...] = ()


class SlurmUnavailable(Exception):
    """Slurm is not installed and cannot be installed here; the message names why."""


class SlurmStartError(RuntimeError):
    """The daemons did not start; the message holds their logs."""


def install() -> float:
    """Installs Slurm and munge with apt-get when missing; returns the seconds it took.

    Raises:
        SlurmUnavailable: a package is missing and apt-get is not available (not Debian-like,
            or not root).
    """
    if all(shutil.which(d) for d in DAEMONS):
        return 0.0
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SlurmUnavailable(
            "slurm-wlm and munge are not installed and apt-get (as root) is not available "
            "to install them")
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(command, env=env, capture_output=True, check=True)
    return time.monotonic() - start


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """A Slurm cluster under `root`: by default one node (this machine, 8 CPUs declared).

    Args:
        root: the directory for the configuration, state, spool and logs.
        nodes: the slurmds (8 CPUs each); default one, this machine at 127.0.0.1.
        controller: the address slurmctld listens at and the command prefix that runs it and
            the Slurm commands of `run` (default 127.0.0.1 on this machine).

    Attributes:
        env: the environment for Slurm commands (`SLURM_CONF` set).
        node: this machine's host name (slurmctld's host).
    """

    def __init__(self, root: str | os.PathLike[str], nodes: Sequence[SlurmNode] = (),
                 controller: tuple[str, tuple[str, ...]] = ("127.0.0.1", ())):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.nodes = list(nodes) or [SlurmNode(self.node, "127.0.0.1")]
        self.controller_addr, self.prefix = controller
        self.procs: list[subprocess.Popen] = []
        self.munge_dir: Path | None = None
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def __enter__(self) -> "LocalSlurm":
        try:
            self._start_munge()
            self._write_config()
            conf = str(self.root / "slurm.conf")
            daemons = [("slurmctld", [*self.prefix, "slurmctld", "-D", "-f", conf])] + [
                (f"slurmd-{n.name}", [*n.prefix, "slurmd", "-D", "-N", n.name, "-f", conf])
                for n in self.nodes]
            for name, command in daemons:
                log = open(self.root / f"{name}.out", "wb")
                self.procs.append(subprocess.Popen(
                    command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
            self._wait_idle(30.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        # Outside `root`: munged (as the munge user) must reach its directory, and a test's
        # temporary directory is usually private to root.
        run = self.munge_dir = Path(tempfile.mkdtemp(prefix="disttrain-munge-"))
        key = run / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        for path in (run, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(run, 0o755)
        os.chmod(key, 0o600)
        self.socket = run / "munge.socket"
        self.procs.append(subprocess.Popen(
            ["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={self.socket}",
             f"--key-file={key}", f"--pid-file={run / 'munged.pid'}",
             f"--log-file={run / 'munged.log'}", f"--seed-file={run / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "munged.out", "wb"),
            start_new_session=True))
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise SlurmStartError(
                    f"munged did not start: {(self.root / 'munged.out').read_text()}")
            time.sleep(0.05)

    def _write_config(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        (self.root / "state").mkdir()
        for n in self.nodes:
            (self.root / "spool" / n.name).mkdir(parents=True)
        r = self.root
        node_lines = "".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs=8 State=UNKNOWN\n"
                             for n in self.nodes)
        (r / "slurm.conf").write_text(f"""\
ClusterName=disttrain-test
SlurmctldHost={self.node}({self.controller_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool' / '%n'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MpiParams=ports={RESERVED_PORTS[0]}-{RESERVED_PORTS[1]}
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=20
MinJobAge=600
{node_lines}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SlurmStartError(f"{' '.join(proc.args)} exited with {proc.returncode}: "
                                           f"{self.logs()}")
            states = subprocess.run([*self.prefix, "sinfo", "-h", "-N", "-o", "%T"],
                                    env=self.env, capture_output=True, text=True).stdout.split()
            if states == ["idle"] * len(self.nodes):
                return
            time.sleep(0.1)
        raise SlurmStartError(f"the nodes did not become idle within {timeout} s: {self.logs()}")

    def logs(self) -> str:
        """The daemons' logs (the end of each), for failure messages."""
        parts = []
        slurmds = [f"slurmd-{n.name}.{suffix}" for n in self.nodes for suffix in ("out", "log")]
        for name in ("munged.out", "slurmctld.out", "slurmctld.log", *slurmds):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def run(self, command: list[str], timeout: float = 120,
            **kwargs) -> subprocess.CompletedProcess:
        """Runs a Slurm command (`srun`, `sbatch`, `scontrol`, ...) against this cluster."""
        return subprocess.run([*self.prefix, *command], env={**self.env, **kwargs.pop("env", {})},
                              capture_output=True, text=True, timeout=timeout, **kwargs)
