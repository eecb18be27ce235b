"""`python -m launch.entrypoint [--peer-timeout S] -- cmd args`: the pod side of a disttrain job.

What it does, in order:

1. **TF_CONFIG.** A `TF_CONFIG` already in the environment (Kubeflow's TFJob sets one) is
   validated with `disttrain.cluster.Cluster` and used as is. Otherwise it is built from what an
   Indexed Job pod has: `JOB_COMPLETION_INDEX` (set by Kubernetes) plus `DISTTRAIN_JOB_NAME`,
   `DISTTRAIN_SERVICE`, `DISTTRAIN_NUM_WORKERS`, `DISTTRAIN_PORT` and optionally
   `DISTTRAIN_NAMESPACE` (set by the manifests `launch.k8s` writes; also the pods of a JobSet,
   and of the JobSet Kubeflow Trainer v2 makes of a TrainJob). Pod `i` is addressed as
   `<job>-<i>.<service>[.<namespace>.svc]:<port>`. The evaluator's pod (`launch.k8s
   --evaluator`) has `DISTTRAIN_TASK_TYPE=evaluator` and the same variables: it becomes the
   evaluator task of that cluster, and waits for nobody.
2. **Run id and attempt.** `DISTTRAIN_RUN_ID` must be set and valid: it names the run's
   outputs and backups, so it must be the same on every pod and across pod restarts, and
   differ between runs. The manifests `launch.k8s` writes take it (Downward API) from a pod
   label holding the UID of the object that owns the pods: `batch.kubernetes.io/controller-uid`
   (the Job's UID; Kubernetes 1.27+) or `jobset.sigs.k8s.io/jobset-uid` (the JobSet's UID;
   JobSet v0.9.0+).
   Kubernetes gives an empty value for a label the pod lacks, so an empty run id means an
   older Kubernetes or JobSet: a configuration error, not a run under a made-up id.
   `DISTTRAIN_ATTEMPT` (the jobset and trainjob manifests take it from JobSet's
   `jobset.sigs.k8s.io/restart-attempt` pod label) must be a number when it is set; an empty
   one is removed.
3. **Wait for the peers** (bounded by `--peer-timeout`), see below.
4. **exec** the command with `TF_CONFIG` set: the command replaces this process, so it gets
   the signals Kubernetes sends to the container and its exit code is the container's.

Why the wait, and why this one
------------------------------
A pod starts before its peers have DNS records (a headless Service publishes a pod's name only
once the pod has an IP) and before they listen. TensorFlow retries a peer that refuses a
connection, but workers that start before their peers' names resolve exit (kubeflow/trainer
issue 1458).

"Wait until every peer's TF server accepts TCP" cannot work as such: a peer's TF server only
listens once *its* program has created the strategy, which happens after *its* entrypoint
finished waiting, so every pod would wait for the others forever. So the entrypoints meet
among themselves on the TF port, before TF takes it:

- while it waits, each entrypoint listens on its own TF port;
- it probes every peer that it has not reached yet (about every 0.5-2 s): the peer's name must
  resolve, a TCP connection to the peer's port must succeed, and over it the entrypoint says
  who it is (`disttrain-entrypoint/1 <cluster fingerprint> <own address>`); the peer's
  entrypoint answers the same way. A peer that accepts TCP but does not answer (its program is
  already running) counts as reached too; one that answers for another task or another
  cluster (a stale DNS record, a pod of an older job) does not;
- it execs once it has reached every peer **and** every peer has reached it.

The second condition is what makes this safe. Without it the last pod to arrive would reach
everyone and exec at once, closing its listener before slower peers probed it, and they would
then depend on its program opening the port. With it, no entrypoint stops listening while a
peer may still need to reach it, so every pair meets whatever the programs do, and there is no
deadlock: a peer that is still waiting keeps probing whoever has not answered it. One probe
meets both conditions for a pair, so all pods exec within a probe interval of the last one's
start. The port is released just before the exec (TF binds it when the strategy is created;
meanwhile TF's own gRPC connections, which it retries, may reach a waiting entrypoint and are
dropped). A peer that never comes (unschedulable, crash-looping, wrong Service name) ends the
wait after `--peer-timeout` seconds with an error naming it and what failed: no DNS record, no
TCP, a wrong answer, or that it never reached this pod. Exit code 3.

By the same rule, a pod restarted alone while its old peers still run TF waits for them to
restart too (they never reach it again), rather than joining a group in the middle of a run.

Exit codes: 2 for a configuration error (bad environment, bad TF_CONFIG, a missing or invalid
DISTTRAIN_RUN_ID, port taken; retrying cannot help, so the Job's podFailurePolicy fails the Job
at once), 3 when peers never became reachable, 126/127 when the command cannot be run;
otherwise whatever the command exits with.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from disttrain.cluster import (
    ENV_ATTEMPT,
    ENV_RUN_ID,
    ENV_TF_CONFIG,
    Cluster,
    build_tf_config,
    is_decimal,
    parse_address,
    validate_run_id,
)
from disttrain.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_COMMAND_NOT_FOUND,
    EXIT_CONFIG_ERROR,
    EXIT_PEERS_UNREACHABLE,
    ClusterConfigError,
)
from launch import tf_config
from launch.cli import split_command

ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
ENV_JOB_NAME = "DISTTRAIN_JOB_NAME"
ENV_SERVICE = "DISTTRAIN_SERVICE"
ENV_NAMESPACE = "DISTTRAIN_NAMESPACE"
ENV_NUM_WORKERS = "DISTTRAIN_NUM_WORKERS"
ENV_PORT = "DISTTRAIN_PORT"
# "evaluator" in the pod of the evaluator's Job (job and jobset formats of launch.k8s): the
# pod builds the training cluster's TF_CONFIG with itself as its evaluator task.
ENV_TASK_TYPE = "DISTTRAIN_TASK_TYPE"

# Pod labels holding the UID of the object whose pods run one job instance; the manifests of
# launch.k8s set DISTTRAIN_RUN_ID from them. Stable across pod restarts and replacements,
# new for every object created, even under the same name.
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"  # set by the Job controller, 1.27+
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"  # set by the JobSet controller, v0.9.0+
# Pod label holding the JobSet's restart attempt (0, then 1, 2, ... each time its failure policy
# recreates every pod); the jobset and trainjob manifests set DISTTRAIN_ATTEMPT from it.
JOBSET_RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"

# Long enough for a node to be added by an autoscaler and pull a TensorFlow image.
DEFAULT_PEER_TIMEOUT = 600.0

_PROTOCOL = "disttrain-entrypoint/1"
_MIN_INTERVAL = 0.5
_MAX_INTERVAL = 2.0
_EXCHANGE_TIMEOUT = 1.0
_PROGRESS_EVERY = 10.0


class PeersUnreachableError(Exception):
    """Some tasks were not met before the deadline."""

    def __init__(self, timeout: float, pending: Mapping[str, str]):
        details = "; ".join(f"{address}: {why}" for address, why in pending.items())
        super().__init__(
            f"{len(pending)} task(s) not ready after {timeout:g} s: {details}. "
            "Fix: check that every pod of the job is running (kubectl get pods) and that the "
            "headless Service (DISTTRAIN_SERVICE) exists with publishNotReadyAddresses: true "
            "and selects these pods, or raise --peer-timeout if pods start slowly."
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
    if not is_decimal(value) or not low <= int(value) <= high:
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
    addresses = tf_config.indexed_job_addresses(job, service, num_workers, port, namespace)
    task_type = environ.get(ENV_TASK_TYPE, "").strip() or "worker"
    if task_type == "evaluator":
        return build_tf_config(addresses, "evaluator", 0)
    if task_type != "worker":
        raise ClusterConfigError(
            f"{ENV_TASK_TYPE}={task_type!r} is not a task type of these pods. Fix: leave it "
            "unset (a worker of the Indexed Job) or set it to 'evaluator' (regenerate the "
            "manifests with `python -m launch.k8s`).")
    index = _integer(environ, ENV_COMPLETION_INDEX, 0, num_workers - 1)
    hostname = environ.get("HOSTNAME", "")
    if hostname and hostname != f"{job}-{index}":
        raise ClusterConfigError(
            f"HOSTNAME={hostname!r} but {ENV_JOB_NAME}={job!r} and {ENV_COMPLETION_INDEX}="
            f"{index} say this pod is '{job}-{index}'. Fix: set {ENV_JOB_NAME} to the name of "
            "the Indexed Job that runs this pod."
        )
    return build_tf_config(addresses, "worker", index)


def run_id_from_env(environ: Mapping[str, str]) -> str:
    """This pod's DISTTRAIN_RUN_ID, which must be set and valid.

    Raises:
        ClusterConfigError: naming what is wrong and the fix.
    """
    run_id = environ.get(ENV_RUN_ID, "")
    if not run_id.strip():
        raise ClusterConfigError(
            f"{ENV_RUN_ID} is empty or not set. Every worker needs the same run id, stable "
            "across pod restarts (else a restarted pod cannot resume from its backup) and new "
            "for each run (else a new run continues an old one's checkpoints and logs). The "
            f"manifests of `python -m launch.k8s` take it from the pod label {JOB_UID_LABEL} "
            f"(Job; Kubernetes 1.27 or newer) or {JOBSET_UID_LABEL} (JobSet v0.9.0 or newer); "
            "it is empty when the pod lacks that label. Fix: upgrade Kubernetes or the JobSet "
            "controller, or regenerate the manifests with --run-id NEW_ID (a new id for each "
            "run), or set DISTTRAIN_RUN_ID yourself."
        )
    return validate_run_id(run_id)


def attempt_from_env(environ: Mapping[str, str]) -> str | None:
    """This pod's DISTTRAIN_ATTEMPT: a number of restarts as a decimal string, or None when it
    is not set or empty (a pod without JobSet's restart-attempt label: the Downward API gives
    an empty value), which the command then does not see at all.

    Raises:
        ClusterConfigError: naming the bad value and the fix.
    """
    attempt = environ.get(ENV_ATTEMPT, "").strip()
    if not attempt:
        return None
    if not is_decimal(attempt):
        raise ClusterConfigError(
            f"{ENV_ATTEMPT}={environ[ENV_ATTEMPT]!r} is not a number of restarts (0, 1, 2, "
            f"...). The jobset and trainjob manifests of `python -m launch.k8s` take it from "
            f"the pod label {JOBSET_RESTART_LABEL}. Fix: set it to the group's restart count "
            "or leave it unset."
        )
    return str(int(attempt))


def resolve_cluster(environ: Mapping[str, str]) -> tuple[Cluster, str]:
    """The cluster of this pod and its TF_CONFIG as JSON: the given one, or one built."""
    given = environ.get(ENV_TF_CONFIG, "")
    if given.strip():
        return Cluster.from_env(environ), given
    built = json.dumps(tf_config_from_env(environ), separators=(",", ":"))
    return Cluster.from_env({**environ, ENV_TF_CONFIG: built}), built


class _Rendezvous:
    """The meeting of one entrypoint with its peers (see the module docstring)."""

    def __init__(self, cluster: Cluster):
        self.own = cluster.training_addresses[cluster.worker_rank]
        self.peers = [a for a in cluster.training_addresses if a != self.own]
        addresses = json.dumps(list(cluster.training_addresses)).encode()
        self.fingerprint = hashlib.sha256(addresses).hexdigest()[:16]
        self.greeting = f"{_PROTOCOL} {self.fingerprint} {self.own}\n".encode()
        self.reached: set[str] = set()
        self.reached_by: set[str] = set()

    def listen(self) -> socket.socket:
        port = parse_address(self.own)[1]
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6,
                                          dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
        server.setblocking(False)
        return server

    def _parse(self, line: bytes) -> tuple[str, str] | None:
        """(fingerprint, address) of a peer's greeting, or None for anything else."""
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 3 and parts[0] == _PROTOCOL:
            return parts[1], parts[2]
        return None

    def serve(self, server: socket.socket) -> None:
        """Answers every pending connection; records which peers have reached this one."""
        while True:
            try:
                connection, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            with connection:
                connection.settimeout(_EXCHANGE_TIMEOUT)
                try:
                    greeting = self._parse(_read_line(connection))
                except OSError:
                    continue
                if greeting is None:
                    # Not an entrypoint (e.g. TF of a peer that already runs): reset it.
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
                    continue
                if greeting[0] == self.fingerprint and greeting[1] in self.peers:
                    self.reached_by.add(greeting[1])
                try:
                    connection.sendall(self.greeting)
                    # Let the prober close first, so that no TIME_WAIT socket holds this port.
                    _read_line(connection)
                except OSError:
                    pass

    def probe(self, address: str) -> str | None:
        """None when `address` resolves and, unless it is this task, was reached; else why not."""
        host, port = parse_address(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return f"name does not resolve ({e.strerror})"
        if address == self.own:
            return None
        ips = ", ".join(sorted({info[4][0] for info in infos}))
        try:
            connection = socket.create_connection((host, port), timeout=_EXCHANGE_TIMEOUT)
        except OSError as e:
            return f"resolves to {ips} but port {port} does not accept TCP ({e})"
        with connection:
            try:
                connection.sendall(self.greeting)
                answer = self._parse(_read_line(connection))
            except OSError:
                answer = None
        if answer is not None and answer != (self.fingerprint, address):
            fingerprint, other = answer
            cluster = "this" if fingerprint == self.fingerprint else "another"
            return (f"resolves to {ips}, but the entrypoint there is {other!r} of {cluster} "
                    "cluster (a stale DNS record, or a pod of another job?)")
        self.reached.add(address)
        return None


def _read_line(connection: socket.socket, limit: int = 256) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = connection.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def wait_for_peers(cluster: Cluster, timeout: float, log: Callable[[str], None]) -> float:
    """Blocks until this task's name resolves, it has reached every peer, and every peer has
    reached it (see the module docstring). Returns the seconds waited.

    Raises:
        PeersUnreachableError: after `timeout` seconds, naming what is still missing.
        ClusterConfigError: when this task's port cannot be bound.
    """
    rendezvous = _Rendezvous(cluster)
    try:
        server = rendezvous.listen()
    except OSError as e:
        raise ClusterConfigError(
            f"cannot listen on the port of {rendezvous.own} ({e}). Fix: free that port in the "
            "pod or choose another one (launch.k8s --port)."
        ) from None
    own_resolves: str | None = "not probed yet"
    start = time.monotonic()
    next_progress = start + _PROGRESS_EVERY
    interval = _MIN_INTERVAL
    with server:
        while True:
            if own_resolves is not None:
                own_resolves = rendezvous.probe(rendezvous.own)
            pending = {rendezvous.own: f"this task's own {own_resolves}"} if own_resolves else {}
            for address in rendezvous.peers:
                if address not in rendezvous.reached:
                    why = rendezvous.probe(address)
                    if why is not None:
                        pending[address] = why
                rendezvous.serve(server)
                if address not in pending and address not in rendezvous.reached_by:
                    pending[address] = ("reached, but it has not reached this task yet (not "
                                        "started, or it cannot reach this pod)")
            now = time.monotonic()
            if not pending:
                return now - start
            if now - start >= timeout:
                raise PeersUnreachableError(timeout, pending)
            if now >= next_progress:
                log(f"still waiting after {now - start:.0f} s for {len(pending)} of "
                    f"{len(cluster.training_addresses)} task(s): "
                    + "; ".join(f"{a}: {w}" for a, w in pending.items()))
                next_progress = now + _PROGRESS_EVERY
            select.select([server], [], [], interval)
            rendezvous.serve(server)
            interval = min(interval * 1.5, _MAX_INTERVAL)


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.entrypoint",
        description="Pod entrypoint: sets TF_CONFIG, waits for the peers, execs the command.",
        usage="%(prog)s [--peer-timeout SECONDS] -- cmd [args ...]",
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT, metavar="SECONDS",
        help=f"how long to wait to meet every peer: its name resolves, its port accepts TCP, "
             f"and it has reached this task (default {DEFAULT_PEER_TIMEOUT:g})",
    )
    options, command = split_command(argv)
    if command is None:
        parser.error("no command: put it after '--', e.g. -- python train.py")
    args = parser.parse_args(options)
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
        run_id = run_id_from_env(os.environ)
        attempt = attempt_from_env(os.environ)
    except ClusterConfigError as e:
        print(f"launch.entrypoint: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR

    def log(message: str) -> None:
        print(f"[launch.entrypoint {cluster.label}] {message}", file=sys.stderr, flush=True)

    if cluster.is_multi_worker and not cluster.is_evaluator:
        log(f"run {run_id}: meeting the other {cluster.num_workers - 1} task(s) on the TF "
            f"port (timeout {args.peer_timeout:g} s)")
        try:
            waited = wait_for_peers(cluster, args.peer_timeout, log)
        except PeersUnreachableError as e:
            log(f"error: {e}")
            return EXIT_PEERS_UNREACHABLE
        except ClusterConfigError as e:
            log(f"error: {e}")
            return EXIT_CONFIG_ERROR
        log(f"met every peer after {waited:.1f} s")
    env = {**os.environ, ENV_TF_CONFIG: tf_config_json}
    env.pop(ENV_ATTEMPT, None)
    if attempt is not None:
        env[ENV_ATTEMPT] = attempt
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"launch.entrypoint: error: command not found: {command[0]!r}",
              file=sys.stderr, flush=True)
        return EXIT_COMMAND_NOT_FOUND
    except PermissionError as e:
        print(f"launch.entrypoint: error: cannot run {command[0]!r}: {e}",
              file=sys.stderr, flush=True)
        return EXIT_CANNOT_EXECUTE


if __name__ == "__main__":
    sys.exit(main())
