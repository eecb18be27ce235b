"""Podman for the container test: install it, build docker/Dockerfile, run a Job's pods.

There is no Docker engine on these machines. Debian's podman builds and runs the Dockerfile
unchanged as root, given what `Podman` sets up, all under one cache directory (`CACHE_DIR`,
kept across runs; nothing touches the system's own podman configuration or images):

- a private `containers.conf`: container rlimits within the VM's own (root here lacks
  CAP_SYS_RESOURCE, so podman's default `nofile` fails with `setrlimit RLIMIT_NOFILE:
  Operation not permitted`), runc (crun 1.8 fails with `cgroups in hybrid mode not
  supported`), cgroupfs and file events (no systemd), its own storage and network directories;
- a base image made without any container registry (none is reachable): `mmdebstrap` builds
  a minimal Debian of this machine's release with python3 from the Debian mirror apt uses,
  plus a venv at /opt/venv first on PATH (Debian's python refuses a root `pip install`);
  `podman import` turns it into an image, passed to the build as `--build-arg BASE=...`. It is
  cached under a tag that is a hash of everything it is made from;
- the host's CA bundle mounted read-only over the build container's at build time: TLS to the
  package registries may go through a proxy that only the host trusts.

Example:

```
reason = install()            # None, or why podman cannot run here (then skip)
podman = Podman()
image = podman.build(podman.base_image(), tf_extra="cpu", tag="localhost/disttrain:test")
with podman.indexed_job(documents, image, volumes) as pods:
    codes = pods.wait(timeout=300)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import REPO_ROOT
from workloads import k8s_pods

CACHE_DIR = Path("/var/tmp/disttrain-podman")
RUN_ROOT = Path("/run/disttrain-podman")
# Debian packages: podman with runc, its network stack (netavark needs iptables; aardvark-dns
# resolves container names and aliases), and mmdebstrap for the base image.
PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "iptables", "mmdebstrap")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
VENV = "/opt/venv"
BASE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CONTAINERS_CONF = f"""\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_config_dir = "{CACHE_DIR}/networks"
"""
# An RFC 2544 benchmarking range: the pods' network is internal, and this range is never
# anyone's real address (tests/launch/test_entrypoint.py's namespaces use 198.18.0.0/24).
SUBNET = "198.18.1.0/24"


def _run(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Runs `argv`; with `check`, a non-zero exit fails naming the command and its output."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return list(PACKAGES)
    status = _run(["dpkg-query", "-W", "-f", "${Package} ${Status}\\n", *PACKAGES],
                  timeout=30, check=False).stdout
    installed = {line.split()[0] for line in status.splitlines()
                 if line.endswith("install ok installed")}
    return [p for p in PACKAGES if p not in installed]


def install() -> str | None:
    """Installs podman and what it needs here with apt-get, where missing.

    Returns None when podman can run, else the reason it cannot (for `pytest.skip`): not
    Linux, not root (the setup here is for root; rootless podman needs subordinate ID ranges),
    no apt-get, or apt-get failing (no network to the Debian mirror), with apt's own words.
    """
    if not sys.platform.startswith("linux"):
        return f"podman containers need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "the container test runs podman as root (rootless podman needs /etc/subuid " \
               "ranges and user namespaces); run it as root"
    missing = _missing_packages()
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"podman is not installed and there is no apt-get to install {missing}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for argv in (["apt-get", *lock, "update", "-qq"],
                 ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends",
                  *missing]):
        proc = _run(argv, timeout=900, env=env, check=False)
        if proc.returncode != 0:
            return (f"`{' '.join(argv)}` failed (exit {proc.returncode}; no network to the "
                    f"Debian mirror?): {(proc.stderr or proc.stdout).strip()[-800:]}")
    return None


def _debian_release() -> tuple[str, str]:
    """This machine's Debian (or derivative) codename and the mirror apt uses for it."""
    release = dict(line.split("=", 1) for line in
                   Path("/etc/os-release").read_text().splitlines() if "=" in line)
    codename = release["VERSION_CODENAME"].strip('"')
    targets = _run(["apt-get", "indextargets", "--format", "$(RELEASE) $(REPO_URI)"],
                   timeout=60).stdout.split("\n")
    mirrors = sorted({line.split()[1] for line in targets if line.split()[:1] == [codename]})
    if not mirrors:
        raise AssertionError(f"apt has no source for {codename!r} to build the base image "
                             "from; add one to /etc/apt/sources.list.d")
    return codename, mirrors[0]


@dataclasses.dataclass
class Podman:
    """Podman with the private configuration, storage and networks under `directory`."""

    directory: Path = CACHE_DIR
    run_root: Path = RUN_ROOT

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf = self.directory / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF.replace(str(CACHE_DIR), str(self.directory)))

    def __call__(self, *args: str, timeout: float = 120, check: bool = True
                 ) -> subprocess.CompletedProcess:
        """Runs `podman ARGS` with this configuration."""
        argv = ["podman", "--root", str(self.directory / "storage"),
                "--runroot", str(self.run_root), *args]
        return _run(argv, timeout, env={**os.environ, "CONTAINERS_CONF": str(self.conf)},
                    check=check)

    def base_image(self) -> str:
        """The registry-free base image (see the module docstring), built once per content."""
        codename, mirror = _debian_release()
        venv_hook = f'chroot "$1" python3 -m venv {VENV}'
        recipe = json.dumps([codename, BASE_PACKAGES, venv_hook, BASE_PATH])
        tag = f"localhost/disttrain-base:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
        if self("image", "exists", tag, check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  f"--customize-hook={venv_hook}", codename, str(rootfs), mirror], timeout=900)
            self("import", "--change", f"ENV PATH={BASE_PATH}", str(rootfs), tag, timeout=300)
        for old in self("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter",
                        "reference=localhost/disttrain-base").stdout.split():
            if old != tag:
                self("rmi", "--force", old, check=False)
        return tag

    def build(self, base: str, tf_extra: str, tag: str) -> str:
        """Builds docker/Dockerfile from `base` with TensorFlow from the extra `tf_extra`.

        The layers stay cached (a rebuild after a code change reuses the dependency layer);
        images left untagged by an earlier build are removed. Returns `tag`."""
        trust = ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if Path(CA_BUNDLE).is_file() else []
        self("build", "--file", str(REPO_ROOT / "docker" / "Dockerfile"),
             "--build-arg", f"BASE={base}", "--build-arg", f"TF_EXTRA={tf_extra}", *trust,
             "--tag", tag, str(REPO_ROOT), timeout=1200)
        self("image", "prune", "--force")
        return tag

    def image_size(self, image: str) -> int:
        """The image's size in bytes, as `podman images` counts it."""
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout)

    @contextlib.contextmanager
    def indexed_job(self, documents: list[dict], image: str,
                    volumes: Sequence[Sequence[str]] = ()) -> Iterator["Pods"]:
        """Runs the pods of the Indexed Job in `documents` (manifests from `launch.k8s`) as
        containers of `image`, one network between them, and removes them all on exit.

        Each pod `i` gets what Kubernetes would give it (workloads/k8s_pods.py): hostname
        `<job>-<i>`, the headless Service's DNS names as network aliases, the container's
        environment, command and args, and its security context: the user, dropped
        capabilities, no privilege escalation, a read-only root filesystem with the emptyDir
        volumes (as tmpfs) the only writable paths. `volumes[i]` are pod `i`'s extra
        `--volume` specs.
        """
        job = documents[-1]
        assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed", job["kind"]
        spec = k8s_pods.pod_spec(documents)
        (container,) = spec["containers"]
        name = job["metadata"]["name"]
        namespace = job["metadata"].get("namespace", "default")
        network = f"{name}-net"
        hostnames = [f"{name}-{i}" for i in range(job["spec"]["completions"])]
        # Leftovers of an interrupted run would hold the names.
        self("rm", "--force", *hostnames, check=False)
        self("network", "rm", "--force", network, check=False)
        self("network", "create", "--internal", "--subnet", SUBNET, network)
        pods = Pods(self, [])
        try:
            for i, hostname in enumerate(hostnames):
                env = k8s_pods.kubernetes_env(container, i, hostname, namespace)
                argv = k8s_pods.pod_argv(container, env)
                split = len(container["command"])
                command, args = argv[:split], argv[split:]
                options = ["--name", hostname, "--hostname", hostname, "--network", network]
                for alias in k8s_pods.dns_names(hostname, spec["subdomain"], namespace):
                    options += ["--network-alias", alias]
                for key, value in env.items():
                    options += ["--env", f"{key}={value}"]
                for volume in volumes[i] if i < len(volumes) else ():
                    options += ["--volume", volume]
                security = {**spec.get("securityContext", {}),
                            **container.get("securityContext", {})}
                if "runAsUser" in security:
                    group = security.get("runAsGroup", security["runAsUser"])
                    options += ["--user", f"{security['runAsUser']}:{group}"]
                if security.get("readOnlyRootFilesystem"):
                    options += ["--read-only", "--read-only-tmpfs=false"]
                empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
                for mount in container.get("volumeMounts", []):
                    if mount["name"] in empty_dirs:
                        options += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
                if "ALL" in security.get("capabilities", {}).get("drop", []):
                    options += ["--cap-drop", "all"]
                if security.get("allowPrivilegeEscalation") is False:
                    options += ["--security-opt", "no-new-privileges"]
                self("run", "--detach", *options, "--entrypoint", json.dumps(command),
                     image, *args)
                pods.names.append(hostname)
            yield pods
        finally:
            if pods.names:
                self("rm", "--force", "--time", "5", *pods.names, check=False)
            self("network", "rm", "--force", network, check=False)


@dataclasses.dataclass
class Prepared:
    """What `prepare` made: the engine and image, or why podman cannot run here."""

    skip_reason: str | None
    engine: "Podman | None" = None
    image: str | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)


def prepare(tf_extra: str, tag: str) -> Prepared:
    """Installs podman, makes the base image and builds docker/Dockerfile as `tag`, timing each
    phase; tests/conftest.py runs it in the background from the session's start."""
    started = time.monotonic()
    prepared = Prepared(skip_reason=install())

    def phase(name: str) -> None:
        prepared.times[name] = time.monotonic() - started - sum(prepared.times.values())

    phase("install")
    if prepared.skip_reason:
        return prepared
    prepared.engine = Podman()
    base = prepared.engine.base_image()
    phase("base")
    prepared.image = prepared.engine.build(base, tf_extra=tf_extra, tag=tag)
    phase("build")
    return prepared


@dataclasses.dataclass
class Pods:
    """The running containers of `Podman.indexed_job`, by index."""

    podman: Podman
    names: list[str]

    def wait(self, timeout: float) -> list[int]:
        """Waits until every pod exited; returns their exit codes by index."""
        codes = self.podman("wait", *self.names, timeout=timeout).stdout.split()
        return [int(code) for code in codes]

    def logs(self, index: int) -> str:
        """Pod `index`'s output, stdout and stderr together."""
        proc = self.podman("logs", self.names[index])
        return proc.stdout + proc.stderr
