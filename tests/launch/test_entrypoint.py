"""Tests of `python -m launch.entrypoint`, the pod side of a disttrain job.

Unit tests check the TF_CONFIG it derives and its errors. Loopback tests run real entrypoint
processes on 127.0.0.1 (TFJob-style, TF_CONFIG given). Simulated-pod tests run each "pod" in its
own network namespace, on a bridge, with its own /etc/hosts: a pod's name appears in every
pod's hosts file only when the pod starts (as a headless Service publishes it once the pod has
an IP), and each pod gets exactly the environment its container spec in the generated manifest
gives it, plus what Kubernetes adds (JOB_COMPLETION_INDEX, HOSTNAME, `$(VAR)` expansion in
args). They need root and `ip netns`, and are skipped, saying why, without them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import uuid

import portpicker
import pytest

from disttrain.cluster import build_tf_config
from disttrain.errors import ClusterConfigError
from launch import entrypoint, k8s, tf_config
from tests.support import REPO_ROOT
from workloads import k8s_pods
from workloads.pod_network import SUBNET, PodNetwork, entrypoint_process, kubernetes_env_here, reap
from tests.support.pod_network import run_pods, wait_for

PRINT_TF_CONFIG = "import os; print('TF_CONFIG=' + os.environ['TF_CONFIG'], flush=True)"


def _pod_env(**overrides: str) -> dict[str, str]:
    env = {"DISTTRAIN_JOB_NAME": "mnist", "DISTTRAIN_SERVICE": "mnist",
           "DISTTRAIN_NUM_WORKERS": "3", "DISTTRAIN_PORT": "2222",
           "JOB_COMPLETION_INDEX": "1", "HOSTNAME": "mnist-1", "DISTTRAIN_RUN_ID": "run-1"}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_tf_config_from_an_indexed_job_pod():
    assert entrypoint.tf_config_from_env(_pod_env()) == {
        "cluster": {"worker": ["mnist-0.mnist:2222", "mnist-1.mnist:2222",
                               "mnist-2.mnist:2222"]},
        "task": {"type": "worker", "index": 1}}
    with_namespace = entrypoint.tf_config_from_env(_pod_env(DISTTRAIN_NAMESPACE="ml"))
    assert with_namespace["cluster"]["worker"][2] == "mnist-2.mnist.ml.svc:2222"
    without_hostname = entrypoint.tf_config_from_env(_pod_env(HOSTNAME=None))
    assert without_hostname["task"] == {"type": "worker", "index": 1}
    evaluator = entrypoint.tf_config_from_env(_pod_env(
        DISTTRAIN_TASK_TYPE="evaluator", JOB_COMPLETION_INDEX="0", HOSTNAME="mnist-evaluator-0"))
    assert evaluator == {"cluster": {"worker": ["mnist-0.mnist:2222", "mnist-1.mnist:2222",
                                                "mnist-2.mnist:2222"]},
                         "task": {"type": "evaluator", "index": 0}}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"JOB_COMPLETION_INDEX": None}, "JOB_COMPLETION_INDEX is not set"),
    ({"DISTTRAIN_JOB_NAME": None}, "DISTTRAIN_JOB_NAME is not set"),
    ({"DISTTRAIN_SERVICE": ""}, "DISTTRAIN_SERVICE is not set"),
    ({"JOB_COMPLETION_INDEX": "3"}, "JOB_COMPLETION_INDEX='3' must be an integer in 0..2"),
    ({"JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX='-1' must be an integer in 0..2"),
    ({"DISTTRAIN_NUM_WORKERS": "two"}, "DISTTRAIN_NUM_WORKERS='two' must be an integer"),
    ({"DISTTRAIN_NUM_WORKERS": "0"}, "DISTTRAIN_NUM_WORKERS='0' must be an integer in 1.."),
    ({"DISTTRAIN_PORT": "99999"}, "DISTTRAIN_PORT='99999' must be an integer in 1..65535"),
    ({"HOSTNAME": "other-1"}, "HOSTNAME='other-1' but DISTTRAIN_JOB_NAME='mnist'"),
    ({"DISTTRAIN_TASK_TYPE": "chief"}, "DISTTRAIN_TASK_TYPE='chief' is not a task type"),
])
def test_bad_pod_environment_is_a_clear_error(overrides, message):
    with pytest.raises(ClusterConfigError, match=re.escape(message)):
        entrypoint.tf_config_from_env(_pod_env(**overrides))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("env", "message"), [
    (_pod_env(JOB_COMPLETION_INDEX=None), "JOB_COMPLETION_INDEX is not set"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}'},
     "task.index='0': must be an integer"),
    ({"TF_CONFIG": "{not json"}, "not valid JSON"),
    (_pod_env(DISTTRAIN_RUN_ID="bad id"), "DISTTRAIN_RUN_ID='bad id' is not a valid run id"),
    # What a pod gets from a Downward API label that the pod does not carry: "".
    (_pod_env(DISTTRAIN_RUN_ID=""), "DISTTRAIN_RUN_ID is empty or not set"),
    (_pod_env(DISTTRAIN_RUN_ID=None), "DISTTRAIN_RUN_ID is empty or not set"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'},
     "DISTTRAIN_RUN_ID is empty or not set"),
    (_pod_env(DISTTRAIN_ATTEMPT="one"), "DISTTRAIN_ATTEMPT='one' is not a number of restarts"),
    (_pod_env(DISTTRAIN_ATTEMPT="-1"), "DISTTRAIN_ATTEMPT='-1' is not a number of restarts"),
    (_pod_env(DISTTRAIN_ATTEMPT="\u00b2"), "is not a number of restarts"),
])
def test_main_exits_2_on_bad_configuration(env, message, monkeypatch, capsys):
    for name in ("TF_CONFIG", "HOSTNAME", *_pod_env(), "DISTTRAIN_NAMESPACE", "DISTTRAIN_RUN_ID",
                 "DISTTRAIN_ATTEMPT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # An environment wrongly accepted must fail the test, not hang it (short peer timeout) or
    # replace the test process with the command (exec).
    def no_exec(*args):
        raise AssertionError(f"the entrypoint accepted the environment and ran {args[1]}")

    monkeypatch.setattr(entrypoint.os, "execvpe", no_exec)
    assert entrypoint.main(["--peer-timeout", "2", "--", "python", "-c", "pass"]) \
        == entrypoint.EXIT_CONFIG_ERROR
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["python", "train.py"], "no command: put it after '--'"),
    (["--"], "no command after '--'"),
    (["--peer-timeout", "0", "--", "true"], "--peer-timeout must be positive"),
    (["--peer-timeout", "soon", "--", "true"], "argument --peer-timeout: invalid float value"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entrypoint.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_command_exits_127(monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in _pod_env(DISTTRAIN_NUM_WORKERS="1", JOB_COMPLETION_INDEX="0",
                                HOSTNAME="mnist-0").items():
        monkeypatch.setenv(name, value)
    assert entrypoint.main(["--", "disttrain-no-such-command"]) == 127
    assert "command not found: 'disttrain-no-such-command'" in capsys.readouterr().err


def test_own_port_taken_exits_2(monkeypatch, capsys):
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    config = build_tf_config(tf_config.local_addresses(ports), "worker", 0)
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    monkeypatch.setenv("DISTTRAIN_RUN_ID", "run-1")
    with socket.create_server(("127.0.0.1", ports[0])):
        assert entrypoint.main(["--peer-timeout", "5", "--", "true"]) == 2
    assert f"cannot listen on the port of 127.0.0.1:{ports[0]}" in capsys.readouterr().err


def _waited(output: str) -> float:
    match = re.search(r"met every peer after ([\d.]+) s", output)
    assert match, output
    return float(match.group(1))


def _loopback_env(tf_config_json: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTTRAIN_", "JOB_"))}
    return {**env, "TF_CONFIG": tf_config_json, "PYTHONPATH": str(REPO_ROOT),
            "DISTTRAIN_RUN_ID": "loopback-1"}


@pytest.mark.timeout(60)
def test_exec_replaces_the_entrypoint_so_signals_reach_the_command(tmp_path):
    env = {**_loopback_env(""), **_pod_env(DISTTRAIN_NUM_WORKERS="1", JOB_COMPLETION_INDEX="0",
                                           HOSTNAME="mnist-0")}
    program = ("import os, time; print(os.getpid(), os.environ['TF_CONFIG'], flush=True); "
               "time.sleep(60)")
    proc = entrypoint_process(["--", "python", "-c", program], env, tmp_path / "out")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "out").read_text().endswith("\n") and time.monotonic() < deadline:
            time.sleep(0.05)
        pid, tf_config_json = (tmp_path / "out").read_text().split()
        assert int(pid) == proc.pid, "the command must replace the entrypoint, not run under it"
        assert json.loads(tf_config_json) == build_tf_config(["mnist-0.mnist:2222"], "worker", 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        reap([proc])


@pytest.mark.timeout(60)
def test_given_tf_config_is_used_as_is_and_a_late_peer_is_awaited(tmp_path):
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    specs = tf_config.cluster_specs(tf_config.local_addresses(ports), evaluator=True)
    # TFJob-style: the operator's TF_CONFIG has extra keys; it must reach the command verbatim.
    given = [json.dumps({**spec.tf_config, "environment": "cloud"}) for spec in specs]
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    args = ["--peer-timeout", "30", "--", "python", "-c", PRINT_TF_CONFIG]
    procs = []
    try:
        procs.append(entrypoint_process(args, _loopback_env(given[1]), logs[1]))
        procs.append(entrypoint_process(args, _loopback_env(given[2]), logs[2]))
        time.sleep(2.5)
        procs.insert(0, entrypoint_process(args, _loopback_env(given[0]), logs[0]))
        outputs = wait_for(procs, logs, timeout=40)
    finally:
        reap(procs)
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    for output, expected in zip(outputs, given):
        assert f"TF_CONFIG={expected}\n" in output
    assert _waited(outputs[1]) >= 2.0, "worker 1 must wait for the late worker 0"
    assert "meeting" not in outputs[2], "an evaluator does not wait"


@pytest.mark.timeout(60)
def test_a_peer_that_never_listens_times_out_naming_it(tmp_path):
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    config = build_tf_config(tf_config.local_addresses(ports), "worker", 0)
    proc = entrypoint_process(["--peer-timeout", "2", "--", "python", "-c", "print('ran')"],
                       _loopback_env(json.dumps(config)), tmp_path / "log")
    (output,) = wait_for([proc], [tmp_path / "log"], timeout=30)
    assert proc.returncode == entrypoint.EXIT_PEERS_UNREACHABLE, output
    assert (f"1 task(s) not ready after 2 s: 127.0.0.1:{ports[1]}: resolves to 127.0.0.1 "
            f"but port {ports[1]} does not accept TCP") in output
    assert "ran" not in output


@pytest.mark.timeout(60)
def test_a_pod_of_another_cluster_on_a_peer_address_does_not_count(tmp_path):
    """A stale DNS record or a leftover pod of an older job answers on a peer's address: the
    entrypoint there belongs to another TF_CONFIG, so it is not taken for the peer."""
    p0, p1, other = (portpicker.pick_unused_port() for _ in range(3))
    ours = build_tf_config(tf_config.local_addresses([p0, p1]), "worker", 0)
    theirs = build_tf_config(tf_config.local_addresses([other, p1]), "worker", 1)
    args = ["--peer-timeout", "3", "--", "python", "-c", "print('ran')"]
    logs = [tmp_path / "ours.log", tmp_path / "theirs.log"]
    procs = [entrypoint_process(args, _loopback_env(json.dumps(theirs)), logs[1])]
    try:
        time.sleep(0.5)
        procs.insert(0, entrypoint_process(args, _loopback_env(json.dumps(ours)), logs[0]))
        outputs = wait_for(procs, logs, timeout=30)
    finally:
        reap(procs)
    assert [p.returncode for p in procs] == [entrypoint.EXIT_PEERS_UNREACHABLE] * 2, outputs
    assert (f"127.0.0.1:{p1}: resolves to 127.0.0.1, but the entrypoint there is "
            f"'127.0.0.1:{p1}' of another cluster") in outputs[0]


PRINT_RUN_ID = "import os; print('RUN_ID=' + os.environ['DISTTRAIN_RUN_ID'], flush=True)"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fmt", "label"), [("job", entrypoint.JOB_UID_LABEL),
                                            ("jobset", entrypoint.JOBSET_UID_LABEL)])
def test_a_new_job_under_the_same_name_is_a_new_run_and_a_replaced_pod_is_not(
        fmt, label, tmp_path):
    """The pods of one Job (JobSet) share its UID, also a pod that replaces a failed one (so
    BackupAndRestore resumes); `kubectl delete` + `apply` of the same manifest creates a new
    object, with a new UID: a new run, which cannot inherit the old run's best checkpoint,
    history or backups. A pod without the label (older Kubernetes or JobSet) stops, exit 2."""
    config = k8s.JobConfig(name="demo", workers=1, image="unused", format=fmt,
                           command=("python", "-c", PRINT_RUN_ID))
    container = k8s_pods.pod_spec(k8s.manifests(config))["containers"][0]
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    def pod(labels: dict[str, str], name: str) -> tuple[int, str]:
        env = {**kubernetes_env_here(container, 0, config.hostname(0), "default", tmp_path,
                                 labels=labels), "PYTHONPATH": str(REPO_ROOT)}
        argv = container["command"] + container["args"]
        proc = entrypoint_process(argv[3:], env, tmp_path / name)
        (output,) = wait_for([proc], [tmp_path / name], timeout=30)
        return proc.returncode, output

    runs = [pod({label: uid}, f"pod{i}") for i, uid in enumerate([first, first, second])]
    assert runs == [(0, f"RUN_ID={first}\n"), (0, f"RUN_ID={first}\n"),
                    (0, f"RUN_ID={second}\n")]
    code, output = pod({}, "unlabelled")
    assert code == entrypoint.EXIT_CONFIG_ERROR
    assert "DISTTRAIN_RUN_ID is empty or not set" in output and label in output
    assert "RUN_ID=" not in output


PRINT_ATTEMPT = ("import os; print('ATTEMPT=' + os.environ.get('DISTTRAIN_ATTEMPT', 'unset'), "
                 "flush=True)")


@pytest.mark.timeout(60)
def test_a_jobset_pod_passes_the_restart_attempt_label_to_the_command(tmp_path):
    """JobSet labels every pod with its restart attempt; the jobset (and trainjob) manifests
    hand it to the command as DISTTRAIN_ATTEMPT, which TrainingReport records. A pod without
    the label gets an empty value from the Downward API, which the command does not see; a Job
    pod has no group attempt at all."""
    def attempt_seen(fmt: str, labels: dict[str, str] | None, attempt: int = 0) -> str:
        config = k8s.JobConfig(name="demo", workers=1, image="unused", format=fmt,
                               command=("python", "-c", PRINT_ATTEMPT))
        container = k8s_pods.pod_spec(k8s.manifests(config))["containers"][0]
        env = {**kubernetes_env_here(container, 0, config.hostname(0), "default", tmp_path,
                                     labels=labels, attempt=attempt),
               "PYTHONPATH": str(REPO_ROOT)}
        name = f"{fmt}-{attempt}-{labels is None}"
        proc = entrypoint_process((container["command"] + container["args"])[3:], env,
                                  tmp_path / name)
        (output,) = wait_for([proc], [tmp_path / name], timeout=30)
        assert proc.returncode == 0, output
        return output.strip()

    assert attempt_seen("jobset", None, attempt=0) == "ATTEMPT=0"
    assert attempt_seen("jobset", None, attempt=2) == "ATTEMPT=2"
    assert attempt_seen("jobset", {entrypoint.JOBSET_UID_LABEL: str(uuid.uuid4())}) \
        == "ATTEMPT=unset"
    assert attempt_seen("job", None, attempt=2) == "ATTEMPT=unset"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fmt", ["job", "jobset"])
def test_simulated_pods_wait_for_a_late_peer_to_resolve(fmt, netns, tmp_path):
    config = k8s.JobConfig(name="demo", workers=2, image="unused", format=fmt,
                           command=("python", "-c", PRINT_TF_CONFIG), peer_timeout=30)
    with PodNetwork(2) as network:
        outputs = run_pods(network, config, order=[1, 0], delay=3.0, tmp_path=tmp_path,
                            timeout=45)
        codes = [p.returncode for p in network.procs]
    assert codes == [0, 0], outputs
    addresses = tf_config.indexed_job_addresses(config.job_name, "demo", 2, 2222, "default")
    for i, output in zip([1, 0], outputs):
        expected = build_tf_config(addresses, "worker", i)
        tf_config_line = next(l for l in output.splitlines() if l.startswith("TF_CONFIG="))
        assert json.loads(tf_config_line.removeprefix("TF_CONFIG=")) == expected
    assert _waited(outputs[0]) >= 2.5, "pod 1 must wait until pod 0's name resolves"


@pytest.mark.timeout(60)
def test_simulated_pod_names_the_peer_that_never_came(netns, tmp_path):
    config = k8s.JobConfig(name="demo", workers=3, image="unused",
                           command=("python", "-c", "print('ran')"), peer_timeout=3)
    with PodNetwork(3) as network:
        # Pod 2 is scheduled (its name resolves) but never starts; pod 1 is never scheduled.
        network.publish(2, ["demo-2.demo.default.svc"])
        (output,) = run_pods(network, config, order=[0, 1, 2], delay=0, tmp_path=tmp_path,
                              timeout=30, start={0})
        (code,) = [p.returncode for p in network.procs]
    assert code == entrypoint.EXIT_PEERS_UNREACHABLE, output
    assert "2 task(s) not ready after 3 s" in output
    assert "demo-1.demo.default.svc:2222: name does not resolve" in output
    assert (f"demo-2.demo.default.svc:2222: resolves to {SUBNET}.3 but port 2222 does not "
            "accept TCP") in output
    assert "ran" not in output


MWMS_PROGRAM = """
import json, os
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(index + 1.0)), axis=None)
print(f"RESULT index={index} replicas={strategy.num_replicas_in_sync} sum={float(total)}")
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulated_pods_train_a_real_mwms_cluster_with_a_late_chief(netns, tmp_path):
    """Two pods from the generated Indexed Job run MultiWorkerMirroredStrategy for real and
    all-reduce across their namespaces; the chief's pod starts 6 s after worker 1's."""
    config = k8s.JobConfig(name="demo", workers=2, image="unused", peer_timeout=120,
                           env=(("TF_CPP_MIN_LOG_LEVEL", "3"),),
                           command=("python", "-c", MWMS_PROGRAM))
    with PodNetwork(2) as network:
        outputs = run_pods(network, config, order=[1, 0], delay=6.0, tmp_path=tmp_path,
                            timeout=200)
        codes = [p.returncode for p in network.procs]
    assert codes == [0, 0], "\n---\n".join(outputs)
    for i, output in zip([1, 0], outputs):
        assert f"RESULT index={i} replicas=2 sum=3.0" in output, output
    assert _waited(outputs[0]) >= 5.0
