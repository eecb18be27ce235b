"""TF_CONFIG parsing and validation (no TensorFlow needed)."""

from __future__ import annotations

import json

import pytest

from disttrain.cluster import Cluster, parse_address
from disttrain.errors import ClusterConfigError
from tests.cluster.platform_shapes import SHAPES

W2 = ["127.0.0.1:2001", "127.0.0.1:2002"]


def cfg(cluster, task):
    return json.dumps({"cluster": cluster, "task": task})


def test_no_tf_config_is_single_worker():
    c = Cluster.from_env({})
    assert (c.num_workers, c.is_chief, c.is_multi_worker, c.run_id) == (1, True, False, None)


def test_worker_zero_is_chief_without_chief_task():
    c0 = Cluster.from_env({"TF_CONFIG": cfg({"worker": W2}, {"type": "worker", "index": 0})})
    c1 = Cluster.from_env({"TF_CONFIG": cfg({"worker": W2}, {"type": "worker", "index": 1})})
    assert c0.is_chief and not c1.is_chief
    assert (c1.num_workers, c1.worker_rank, c1.label, c1.is_multi_worker) == (2, 1, "w1", True)


def test_separate_chief_and_evaluator():
    cluster = {"chief": ["127.0.0.1:2000"], "worker": W2}
    chief = Cluster.from_tf_config(cfg(cluster, {"type": "chief", "index": 0}))
    w0 = Cluster.from_tf_config(cfg(cluster, {"type": "worker", "index": 0}))
    ev = Cluster.from_tf_config(cfg(cluster, {"type": "evaluator", "index": 0}))
    assert chief.is_chief and not w0.is_chief and not ev.is_chief
    assert (chief.num_workers, w0.worker_rank, ev.worker_rank) == (3, 1, -1)
    assert ev.is_evaluator and ev.label == "evaluator"
    assert Cluster.from_tf_config(chief.to_tf_config()) == chief


def test_run_id_from_env():
    env = {"TF_CONFIG": cfg({"worker": W2}, {"type": "worker", "index": 0}),
           "DISTTRAIN_RUN_ID": "exp-1"}
    assert Cluster.from_env(env).run_id == "exp-1"
    with pytest.raises(ClusterConfigError, match="DISTTRAIN_RUN_ID='bad id/'"):
        Cluster.from_env({"DISTTRAIN_RUN_ID": "bad id/"})


def test_ipv6_and_hostnames():
    assert parse_address("[::1]:2222") == ("[::1]", 2222)
    assert parse_address("job-0.svc.ns.svc:2222") == ("job-0.svc.ns.svc", 2222)


@pytest.mark.parametrize(
    "raw, field, fix",
    [
        ("{not json", "not valid JSON", "JSON object"),
        ("[1, 2]", "must be a JSON object", "cluster"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "cluster=None: missing", "add"),
        (cfg({"worker": W2}, None), "task=None: missing", "task"),
        (json.dumps({"cluster": {"worker": W2}, "task": {"index": 0}}), "task.type", "type"),
        (json.dumps({"cluster": {"worker": W2}, "task": {"type": "worker"}}), "task.index",
         "index"),
        (cfg({"worker": W2}, {"type": "master", "index": 0}), "task.type='master'",
         "add 'master'"),
        (cfg({"worker": W2}, {"type": "Worker", "index": 0}), "task.type='Worker'",
         "'chief', 'worker', 'evaluator'"),
        (cfg({"workers": W2}, {"type": "worker", "index": 0}), "cluster.workers",
         "'chief', 'worker'"),
        (cfg({"worker": W2, "ps": ["h:1"]}, {"type": "worker", "index": 0}),
         "cluster.ps=['h:1']: a parameter-server job", "without parameter servers"),
        (cfg({"worker": W2, "evaluator": ["h:1", "h:2"]}, {"type": "worker", "index": 0}),
         "cluster.evaluator=['h:1', 'h:2']: there can be at most one evaluator",
         "one evaluator task"),
        (cfg({"worker": W2, "evaluator": ["127.0.0.1:2001"]}, {"type": "worker", "index": 0}),
         "cluster.evaluator[0]='127.0.0.1:2001': duplicate", "own host:port"),
        (cfg({"chief": ["h:1"], "master": ["h:2"], "worker": W2}, {"type": "chief", "index": 0}),
         "cluster.master=['h:2']: 'master' is another name for 'chief'", "keep one"),
        (cfg({"worker": W2}, {"type": "worker", "index": "1"}), "task.index='1'", "without quotes"),
        (cfg({"worker": W2}, {"type": "worker", "index": 1.0}), "task.index=1.0", "integer"),
        (cfg({"worker": W2}, {"type": "worker", "index": True}), "task.index=True", "integer"),
        (cfg({"worker": W2}, {"type": "worker", "index": 2}), "out of range", "0..1"),
        (cfg({"worker": W2}, {"type": "worker", "index": -1}), "out of range", "0..1"),
        (cfg({"worker": W2}, {"type": "chief", "index": 0}), "no 'chief' entry", "add 'chief'"),
        (cfg({"worker": W2}, {"type": "evaluator", "index": 1}), "task.index=1", "index\": 0"),
        (cfg({"worker": []}, {"type": "worker", "index": 0}), "cluster.worker=[]: is empty",
         "at least one"),
        (cfg({}, {"type": "worker", "index": 0}), "lists no training task", "worker"),
        (cfg({"worker": "127.0.0.1:1"}, {"type": "worker", "index": 0}), "must be a list",
         "host:port"),
        (cfg({"worker": ["127.0.0.1:1", "127.0.0.1:1"]}, {"type": "worker", "index": 0}),
         "cluster.worker[1]='127.0.0.1:1': duplicate address (also cluster.worker[0])",
         "own host:port"),
        (cfg({"chief": ["a:1"], "worker": ["A:1"]}, {"type": "worker", "index": 0}),
         "duplicate", "own host:port"),
        (cfg({"worker": ["127.0.0.1"]}, {"type": "worker", "index": 0}),
         "cluster.worker[0]='127.0.0.1': not a valid", "'host:port'"),
        (cfg({"worker": ["127.0.0.1:0"]}, {"type": "worker", "index": 0}), "1..65535", "host:port"),
        (cfg({"worker": ["127.0.0.1:99999"]}, {"type": "worker", "index": 0}), "1..65535",
         "host:port"),
        (cfg({"worker": ["127.0.0.1:http"]}, {"type": "worker", "index": 0}), "port", "host:port"),
        (cfg({"worker": ["bad host:1"]}, {"type": "worker", "index": 0}), "not a valid",
         "host:port"),
        (cfg({"worker": [2222]}, {"type": "worker", "index": 0}), "must be a string", "host:port"),
        (cfg({"chief": ["a:1", "b:1"], "worker": W2}, {"type": "chief", "index": 0}),
         "exactly one chief", "under 'worker'"),
        (json.dumps({"cluster": {"worker": W2}, "task": {"type": "worker", "index": 0},
                     "tasks": 1}), "unknown top-level keys", "keep only"),
    ],
)
def test_malformed_tf_config(raw, field, fix):
    with pytest.raises(ClusterConfigError) as info:
        Cluster.from_env({"TF_CONFIG": raw})
    message = str(info.value)
    assert message.startswith("TF_CONFIG")
    assert field in message
    assert "Fix:" in message and fix in message


def test_importing_cluster_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, disttrain, disttrain.cluster, launch.tf_config; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_platform_shape_parses_with_one_chief_and_a_training_view_tf_accepts(shape):
    addresses = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    configs = SHAPES[shape](addresses, "10.0.0.9:2222")
    clusters = [Cluster.from_env({"TF_CONFIG": json.dumps(c)}) for c in configs]
    training = [c for c in clusters if not c.is_evaluator]
    assert [c.worker_rank for c in training] == [0, 1, 2]
    assert [c.is_chief for c in training] == [True, False, False]
    assert {c.training_addresses for c in clusters} == {tuple(addresses)}
    for c in clusters:
        view = c.to_tf_config()
        assert set(view) == {"cluster", "task"}
        assert set(view["cluster"]) <= {"chief", "worker"}
        assert view["task"]["type"] in ("chief", "worker", "evaluator")
    if shape.startswith(("vertex", "tfjob")):
        assert training[0].task_type == "chief" and training[0].label == "chief"
        assert clusters[-1].is_evaluator and not clusters[-1].is_chief
        assert clusters[-1].worker_rank == -1


def test_the_evaluator_must_be_told_the_run_id():
    from disttrain.coordination import Coordinator, InProcessTransport

    evaluator = Cluster.from_env({"TF_CONFIG": cfg({"worker": W2},
                                                   {"type": "evaluator", "index": 0})})
    with pytest.raises(ClusterConfigError, match="the evaluator task needs the training run's "
                       "id, and DISTTRAIN_RUN_ID is not set.*Fix: set DISTTRAIN_RUN_ID"):
        Coordinator(evaluator, transport=InProcessTransport()).run_id()
    told = Cluster.from_env({"TF_CONFIG": cfg({"worker": W2}, {"type": "evaluator", "index": 0}),
                             "DISTTRAIN_RUN_ID": "run-7"})
    assert Coordinator(told, transport=InProcessTransport()).run_id() == "run-7"
