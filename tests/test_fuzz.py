"""Bad input under a property-based fuzzer (Hypothesis): TF_CONFIG (`disttrain.cluster`), the
variables of srun, mpirun and other launchers (`disttrain.cluster.launcher_env`), a pod's
environment (`launch.entrypoint`), and the arguments of `launch.local` and `launch.k8s`.

Each is called in-process with generated input, valid and not, and may only accept it (and
then give a sound result) or refuse it with disttrain's own error, whose message names the
fix; never another exception (a traceback for the user). Parsing starts no process, and each
test has a time bound, so a hang fails it. The examples are bounded and derandomized, so a run
is fast and repeatable.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import string

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from disttrain.cluster import Cluster
from disttrain.cluster.launcher_env import derive_from_launcher
from disttrain.errors import DisttrainError
from launch import entrypoint, k8s, local

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# What a process's argv and environment can hold: any text without NUL.
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
               max_size=24)
NUMBERS = st.sampled_from(["0", "1", "2", "-1", "3.5", "1e3", "nan", "inf", "-inf", "²",
                           "٣", "0x10", "65536", "99999999999999999999", " 2", "2 "])
WORDS = st.one_of(TEXT, NUMBERS, st.sampled_from(["", "--", "-", "worker", "evaluator", "chief",
                                                  "127.0.0.1", "[::1]", "a:b", "gs://b/x"]))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)
TASK_TYPES = st.sampled_from(["worker", "chief", "evaluator", "ps", "master", "", "Worker"])
ADDRESSES = st.one_of(
    st.builds("{}:{}".format, st.sampled_from(["127.0.0.1", "host-1", "[::1]", "::1", "", "a b"]),
              st.one_of(st.integers(-1, 70000), NUMBERS)),
    JSON)
TF_CONFIGS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"cluster": st.one_of(st.dictionaries(TASK_TYPES, st.lists(ADDRESSES, max_size=3),
                                              max_size=3), JSON),
         "task": st.one_of(st.fixed_dictionaries({"type": TASK_TYPES,
                                                  "index": st.one_of(st.integers(-2, 4), JSON)}),
                           JSON)},
        optional={"environment": JSON, "rpc_layer": JSON}))


def _refused_properly(error: BaseException) -> None:
    assert isinstance(error, DisttrainError), f"{type(error).__name__}: {error}"
    assert "Fix" in str(error) or "fix" in str(error), str(error)


@FUZZ
@given(TF_CONFIGS, st.one_of(st.none(), TEXT))
@example("[" * 100_000, None)
@example('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1e400}}', None)
@example({"cluster": {"worker": ["a:²"]}, "task": {"type": "worker", "index": 0}}, None)
def test_tf_config_is_accepted_or_refused_with_a_clear_error(tf_config, run_id):
    text = tf_config if isinstance(tf_config, str) else json.dumps(tf_config)
    for call in (lambda: Cluster.from_tf_config(tf_config, run_id=run_id),
                 lambda: Cluster.from_env({"TF_CONFIG": text, "DISTTRAIN_RUN_ID": run_id or ""})):
        try:
            cluster = call()
        except Exception as e:  # noqa: BLE001 - the property: only disttrain's own errors
            _refused_properly(e)
            continue
        assert 0 <= cluster.worker_rank < max(1, cluster.num_workers) or cluster.is_evaluator
        assert Cluster.from_tf_config(cluster.to_tf_config(), run_id=cluster.run_id) == cluster


POD_ENV = st.dictionaries(
    st.sampled_from([entrypoint.ENV_JOB_NAME, entrypoint.ENV_SERVICE, entrypoint.ENV_NAMESPACE,
                     entrypoint.ENV_NUM_WORKERS, entrypoint.ENV_PORT, entrypoint.ENV_TASK_TYPE,
                     entrypoint.ENV_COMPLETION_INDEX, "HOSTNAME", "DISTTRAIN_RUN_ID",
                     "DISTTRAIN_ATTEMPT"]),
    WORDS, max_size=10)


@FUZZ
@given(POD_ENV)
@example({entrypoint.ENV_JOB_NAME: "j", entrypoint.ENV_SERVICE: "s",
          entrypoint.ENV_NUM_WORKERS: "²", entrypoint.ENV_PORT: "2222"})
def test_pod_environment_is_accepted_or_refused_with_a_clear_error(environ):
    base = {entrypoint.ENV_JOB_NAME: "job", entrypoint.ENV_SERVICE: "job",
            entrypoint.ENV_NUM_WORKERS: "2", entrypoint.ENV_PORT: "2222",
            entrypoint.ENV_COMPLETION_INDEX: "1"}
    for env in (environ, {**base, **environ}):
        try:
            cluster, tf_config = entrypoint.resolve_cluster(env)
            entrypoint.run_id_from_env(env)
            attempt = entrypoint.attempt_from_env(env)
        except Exception as e:  # noqa: BLE001
            _refused_properly(e)
            continue
        assert Cluster.from_tf_config(tf_config) == cluster.__class__.from_tf_config(
            cluster.to_tf_config())
        assert attempt is None or int(attempt) >= 0


LOCAL_FLAGS = st.sampled_from(
    ["--workers", "--chief", "--evaluator", "--host", "--run-id", "--grace", "--max-restarts",
     "--timeout", "--startup-timeout", "--threads-per-worker", "--listen-all", "--dry-run",
     "--show-all", "--bogus"])


def _argv(flags: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    options = st.lists(st.one_of(flags.map(lambda f: [f]), st.tuples(flags, WORDS).map(list)),
                       max_size=5)
    command = st.sampled_from([[], ["--"], ["--", "true"], ["--", "/nonexistent/x"]])
    return st.builds(lambda o, c: [x for option in o for x in option] + c, options, command)


def _exit_2_with_message(call) -> object | None:
    """Runs an argparse-based entry point; returns its result, or None after checking it
    refused with exit 2 and an `error:` message (and no traceback)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return call()
    except SystemExit as e:
        assert e.code == 2, (e.code, stderr.getvalue())
        assert "error: " in stderr.getvalue() and "Traceback" not in stderr.getvalue()
        return None


@FUZZ
@given(_argv(LOCAL_FLAGS))
@example(["--timeout", "nan"])
@example(["--grace", "inf"])
def test_launch_local_arguments_are_accepted_or_refused_with_exit_2(argv):
    config = _exit_2_with_message(lambda: local.parse_args(argv))
    if config is not None:
        for value in (config.grace, config.timeout, config.startup_timeout):
            assert value is None or math.isfinite(value), config
        assert config.workers >= 1 and config.command


K8S_FLAGS = st.sampled_from(
    ["--name", "--workers", "--image", "--namespace", "--cpu", "--memory", "--gpus", "--port",
     "--checkpoint-url", "--service-account", "--gcp-key-secret", "--env", "--run-id",
     "--max-restarts", "--peer-timeout", "--termination-grace", "--format", "--evaluator"])
K8S_NAMES = st.one_of(st.sampled_from(["mnist", "a", "x" * 70]), st.text(
    string.ascii_lowercase + string.digits + "-.", max_size=20))


@FUZZ
@given(K8S_NAMES, _argv(K8S_FLAGS))
def test_launch_k8s_arguments_are_accepted_or_refused_with_exit_2(name, argv):
    out = io.StringIO()
    required = ["--name", name, "--workers", "2", "--image", "img:1"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stderr):
            code = k8s.main([*required, *argv])
    except SystemExit as e:
        assert e.code == 2, (e.code, stderr.getvalue())
        assert "error: " in stderr.getvalue() and "Traceback" not in stderr.getvalue()
        return
    assert code == 0
    documents = [d for d in yaml.safe_load_all(out.getvalue()) if d]
    assert documents[0]["kind"] == "NetworkPolicy"


# What srun, mpirun and other launchers set: names from launcher_env, values valid and not.
HOSTLISTS = st.one_of(WORDS, st.sampled_from(
    ["node1", "node[1-2]", "node[01-03,07]", "gpu-a[1-2],node9", "n[2-1]", "n[1-", "n[a-b]",
     "n[1-99999999]", "n[0001-0002]", "[1-2]", "a,b", "a,,b"]))
TASKS_PER_NODE = st.one_of(WORDS, st.sampled_from(
    ["1", "2", "1(x2)", "2(x3),1", "(x2)", "1(x0)", "0", "2(x99999999)", "1,1", "3(x2"]))
PORTS = st.one_of(WORDS, st.sampled_from(
    ["12000", "12000-12003", "12000,12005", "0", "65535-65537", "70000", "12003-12000"]))
LAUNCHER_ENV = st.fixed_dictionaries({}, optional={
    "SLURM_JOB_ID": st.one_of(NUMBERS, WORDS), "SLURM_STEP_ID": st.one_of(NUMBERS, WORDS),
    "SLURM_STEP_NUM_TASKS": NUMBERS, "SLURM_NTASKS": NUMBERS,
    "SLURM_STEP_NODELIST": HOSTLISTS, "SLURM_STEP_TASKS_PER_NODE": TASKS_PER_NODE,
    "SLURMD_NODENAME": st.one_of(WORDS, st.sampled_from(["node1", "node2", "node07", "n1"])),
    "SLURM_LOCALID": NUMBERS, "SLURM_STEP_RESV_PORTS": PORTS,
    "OMPI_COMM_WORLD_SIZE": NUMBERS, "OMPI_COMM_WORLD_LOCAL_SIZE": NUMBERS,
    "OMPI_COMM_WORLD_RANK": NUMBERS,
    # Never a real directory: rank != 0 would then wait for rank 0's ports (a real mpirun
    # runs that path in tests/launch/mpi).
    "PMIX_SERVER_TMPDIR": st.sampled_from(["", "/nonexistent-mpirun-session"]),
    "PMIX_NAMESPACE": WORDS, "PMIX_RANK": WORDS, "PMI_SIZE": NUMBERS, "PMI_RANK": NUMBERS,
    "WORLD_SIZE": NUMBERS, "RANK": NUMBERS, "DISTTRAIN_RUN_ID": WORDS})


@FUZZ
@given(LAUNCHER_ENV)
@example({"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
          "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
          "SLURMD_NODENAME": "node2", "SLURM_LOCALID": "0", "SLURM_STEP_RESV_PORTS": "70000"})
@example({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
          "OMPI_COMM_WORLD_RANK": "5"})
def test_launcher_environment_is_accepted_or_refused_with_a_clear_error(environ):
    """SLURM_*, Open MPI's and other launchers' variables: a sound cluster (this task among
    its workers, every port valid, one worker per task) or disttrain's own error."""
    try:
        cluster = derive_from_launcher(environ)
    except Exception as e:  # noqa: BLE001 - the property: only disttrain's own errors
        _refused_properly(e)
        return
    if cluster is None:
        return
    assert 0 <= cluster.worker_rank < cluster.num_workers, cluster
    for address in cluster.workers:
        assert 1 <= int(address.rsplit(":", 1)[1]) <= 65535, cluster
    tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
    if cluster.source.startswith("Slurm") and cluster.num_workers > 1:
        assert str(cluster.num_workers) == tasks.strip(), (cluster, environ)
    if cluster.workers:
        assert Cluster.from_tf_config(cluster.to_tf_config(), run_id=cluster.run_id) == cluster
