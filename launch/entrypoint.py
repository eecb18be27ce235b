"""`python -m launch.entrypoint [--peer-timeout S] -- cmd args`: the pod side of a disttrain job.

What it does, in order:

1. **TF_CONFIG.** A `TF_CONFIG` already in the environment (Kubeflow's TFJob sets one) is
   validated with `disttrain.cluster.Cluster` and used as is. Otherwise it is built from what an
   Indexed Job pod has: `JOB_COMPLETION_INDEX` (set by Kubernetes) plus `DISTTRAIN_JOB_NAME`,
   `DISTTRAIN_SERVICE`, `DISTTRAIN_NUM_WORKERS`, `DISTTRAIN_PORT` and optionally
   `DISTTRAIN_NAMESPACE` (set by the manifests `launch.k8s` writes). Pod `i` is addressed as
   `<job>-<i>.<service>[.<namespace>.svc]:<port>`.
2. **Wait for the peers** (bounded by `--peer-timeout`), see below.
3. **exec** the command with `TF_CONFIG` set: the command replaces this process, so it gets
   the signals Kubernetes sends to the container and its exit code is the container's.

Why the wait, and why this one
------------------------------
A pod starts before its peers have DNS records (a headless Service publishes a pod's name only
once the pod has an IP) and before they listen. TensorFlow retries a peer that refuses a
connection, but gives up on a name that does not resolve, so workers that start early die.

"Wait until every peer's TF server accepts TCP" cannot work as such: a peer's TF server only
listens once *its* program has created the strategy, which happens after *its* entrypoint
finished waiting, so every pod would wait for the others forever. Instead, while it waits, the
entrypoint itself listens on its own TF port (it accepts and drops connections), and a peer
counts as reachable the first time its name resolves **and** a TCP connection to its port
succeeds, whoever answers: the peer's entrypoint (still waiting) or the peer's TF server
(already running). The entrypoint releases the port just before the exec, and TF binds it when
the program creates its strategy. This cannot deadlock: a peer that is still waiting answers on
its port, and a peer that has moved on answers once its program creates its strategy, which it
does without waiting for anyone. A peer that never comes (unschedulable, crash-looping, wrong
Service name) ends the wait after `--peer-timeout` seconds with an error naming it and what
failed (no DNS record, or no TCP), exit code 3.

Exit codes: 2 for a configuration error (bad environment, bad TF_CONFIG, port taken; retrying
cannot help, so the Job's podFailurePolicy fails the Job at once), 3 when peers never became
reachable, 126/127 when the command cannot be run; otherwise whatever the command exits with.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from disttrain.cluster import ENV_TF_CONFIG, Cluster, parse_address
from disttrain.errors import ClusterConfigError
from launch import tf_config

ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
ENV_JOB_NAME = "DISTTRAIN_JOB_NAME"
ENV_SERVICE = "DISTTRAIN_SERVICE"
ENV_NAMESPACE = "DISTTRAIN_NAMESPACE"
ENV_NUM_WORKERS = "DISTTRAIN_NUM_WORKERS"
ENV_PORT = "DISTTRAIN_PORT"

EXIT_CONFIG_ERROR = 2
EXIT_PEERS_UNREACHABLE = 3
DEFAULT_PEER_TIMEOUT = 300.0

_POLL_SECONDS = 0.5
_CONNECT_TIMEOUT = 1.0
_PROGRESS_EVERY = 10.0


class PeersUnreachableError(Exception):
    """Some peers did not resolve or accept TCP before the deadline."""

    def __init__(self, timeout: float, pending: Mapping[str, str]):
        self.pending = dict(pending)
        details = "; ".join(f"{address}: {why}" for address, why in self.pending.items())
        super().__init__(
            f"{len(self.pending)} peer(s) not reachable after {timeout:g} s: {details}. "
            "Fix: check that every pod of the job is running (kubectl get pods), that the "
            "headless Service named in DISTTRAIN_SERVICE exists with publishNotReadyAddresses: "
            "true and selects these pods, or raise --peer-timeout if pods start slowly."
        )


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ClusterConfigError(
            f"{name} is not set. Fix: run in a pod of the manifests `python -m launch.k8s` "
            f"writes (they set {name}), or set TF_CONFIG yourself."
        )
    return value


def _integer(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    value = _required(env, name)
    if not value.isdigit() or not low <= int(value) <= high:
        raise ClusterConfigError(
            f"{name}={value!r} must be an integer in {low}..{high}. Fix: correct {name} in "
            "the pod spec (regenerate the manifests with `python -m launch.k8s`)."
        )
    return int(value)


def tf_config_from_env(environ: Mapping[str, str]) -> dict:
    """TF_CONFIG for this pod of an Indexed Job, from the pod's environment.

    Raises:
        ClusterConfigError: naming the missing or bad variable and the fix.
    """
    job = _required(environ, ENV_JOB_NAME)
    service = _required(environ, ENV_SERVICE)
    namespace = environ.get(ENV_NAMESPACE, "").strip() or None
    num_workers = _integer(environ, ENV_NUM_WORKERS, 1, 100_000)
    port = _integer(environ, ENV_PORT, 1, 65535)
    index = _integer(environ, ENV_COMPLETION_INDEX, 0, num_workers - 1)
    hostname = environ.get("HOSTNAME", "")
    if hostname and hostname != f"{job}-{index}":
        raise ClusterConfigError(
            f"HOSTNAME={hostname!r} but {ENV_JOB_NAME}={job!r} and {ENV_COMPLETION_INDEX}="
            f"{index} say this pod is '{job}-{index}'. Fix: set {ENV_JOB_NAME} to the name of "
            "the Indexed Job that runs this pod."
        )
    addresses = tf_config.indexed_job_addresses(job, service, num_workers, port, namespace)
    return tf_config.build(addresses, "worker", index)


def resolve_cluster(environ: Mapping[str, str]) -> tuple[Cluster, str]:
    """The cluster of this pod and its TF_CONFIG as JSON: the given one, or one built."""
    given = environ.get(ENV_TF_CONFIG, "")
    if given.strip():
        return Cluster.from_env(environ), given
    built = json.dumps(tf_config_from_env(environ), separators=(",", ":"))
    return Cluster.from_env({**environ, ENV_TF_CONFIG: built}), built


def _listen(port: int) -> socket.socket:
    if socket.has_dualstack_ipv6():
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        server = socket.create_server(("", port))
    server.setblocking(False)
    return server


def _drop_connections(server: socket.socket) -> None:
    """Accepts and resets every pending connection: the port only has to answer."""
    while True:
        try:
            connection, _ = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()


def _probe(address: str, check_tcp: bool) -> str | None:
    """None when `address` resolves (and accepts TCP if asked), else why not."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"name does not resolve ({e.strerror})"
    if not check_tcp:
        return None
    ips = sorted({info[4][0] for info in infos})
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT).close()
    except OSError as e:
        return f"resolves to {', '.join(ips)} but port {port} does not accept TCP ({e})"
    return None


def wait_for_peers(
    cluster: Cluster,
    timeout: float,
    log: Callable[[str], None],
) -> float:
    """Blocks until every training task resolves and every peer accepts TCP.

    Listens on this task's own port meanwhile (see the module docstring). Returns the seconds
    waited.

    Raises:
        PeersUnreachableError: after `timeout` seconds, naming what is still missing.
        OSError: when this task's port cannot be bound.
    """
    own = cluster.training_addresses[cluster.worker_rank]
    pending = {address: "not probed yet" for address in cluster.training_addresses}
    start = time.monotonic()
    next_progress = start + _PROGRESS_EVERY
    with _listen(parse_address(own)[1]) as server:
        while True:
            for address in list(pending):
                why = _probe(address, check_tcp=address != own)
                if why is None:
                    del pending[address]
                else:
                    pending[address] = why
                _drop_connections(server)
            now = time.monotonic()
            if not pending:
                return now - start
            if now - start >= timeout:
                raise PeersUnreachableError(timeout, pending)
            if now >= next_progress:
                log(f"still waiting for {len(pending)} of {len(cluster.training_addresses)} "
                    f"task(s) after {now - start:.0f} s: " + "; ".join(
                        f"{a}: {w}" for a, w in pending.items()))
                next_progress = now + _PROGRESS_EVERY
            select.select([server], [], [], _POLL_SECONDS)
            _drop_connections(server)


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.entrypoint",
        description="Pod entrypoint: sets TF_CONFIG, waits for the peers, execs the command.",
        usage="%(prog)s [--peer-timeout SECONDS] -- cmd [args ...]",
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT, metavar="SECONDS",
        help=f"how long to wait for every peer to resolve and accept TCP "
             f"(default {DEFAULT_PEER_TIMEOUT:g})",
    )
    argv = list(argv)
    if "--" not in argv:
        parser.error("no command: put it after '--', e.g. -- python train.py")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after '--', e.g. -- python train.py")
    if not args.peer_timeout > 0:
        parser.error(f"--peer-timeout must be positive, got {args.peer_timeout:g}")
    return args, command


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the entrypoint; on success does not return (the command replaces the process)."""
    args, command = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cluster, tf_config_json = resolve_cluster(os.environ)
    except ClusterConfigError as e:
        print(f"launch.entrypoint: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR

    def log(message: str) -> None:
        print(f"[launch.entrypoint {cluster.label}] {message}", file=sys.stderr, flush=True)

    if cluster.is_multi_worker and not cluster.is_evaluator:
        log(f"waiting for {cluster.num_workers} tasks to resolve and accept TCP "
            f"(timeout {args.peer_timeout:g} s)")
        try:
            waited = wait_for_peers(cluster, args.peer_timeout, log)
        except PeersUnreachableError as e:
            log(f"error: {e}")
            return EXIT_PEERS_UNREACHABLE
        except OSError as e:
            own = cluster.training_addresses[cluster.worker_rank]
            log(f"error: cannot listen on the port of {own} ({e}). Fix: free that port in "
                "the pod or choose another one (launch.k8s --port).")
            return EXIT_CONFIG_ERROR
        log(f"all peers reachable after {waited:.1f} s")
    env = {**os.environ, ENV_TF_CONFIG: tf_config_json}
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"launch.entrypoint: error: command not found: {command[0]!r}",
              file=sys.stderr, flush=True)
        return 127
    except PermissionError as e:
        print(f"launch.entrypoint: error: cannot run {command[0]!r}: {e}",
              file=sys.stderr, flush=True)
        return 126


if __name__ == "__main__":
    sys.exit(main())
