"""A tiny stand-in for a training script, for the launcher tests (standard library only).

Usage: worker.py MODE [ARGS]

  report                 print `REPORT <json>` describing its environment; the chief
                         writes a result JSON to DISTTRAIN_RESULT_FILE
  wait                   print `ready pid=N`, then wait; on SIGTERM print `got SIGTERM`, exit 143
  fail LABEL CODE        task LABEL writes `boom` to stderr and exits CODE; the others `wait`
  fail-stubborn LABEL CODE  the same, but the others ignore SIGTERM
  fail-attempt0 CODE     report; on attempt 0 task w1 then exits CODE, the others `wait`
  clash-attempt0 KIND    on attempt 0 task w1 fails the way a port clash looks (KIND `os`:
                         a real EADDRINUSE from binding its TF_CONFIG port twice; `tf`:
                         the lines TensorFlow 2.21 prints); otherwise report
  always-clash           task w1 always fails with TensorFlow's port clash lines
  progress N             N carriage-return progress updates written in random pieces
  eval-lingers           training tasks report; the evaluator `wait`s
  eval-fails CODE        the evaluator writes `eval boom` to stderr and exits CODE at once;
                         training tasks sleep 1.5 s, then report
  early-exit LATE CODE   w1 exits 0 at once (as if it left training early); task LATE exits
                         CODE after 1 s (as its peers do when one is gone); the others `wait`
  grandchild             start a `silent` child in the same process group, then `wait`
  leave-child            start a `silent` child in the same process group, then exit 0
  silent                 sleep without writing anything
  listen                 listen on its TF_CONFIG port on every interface, as TensorFlow's
                         server does (dual-stack `[::]`), print `listening PORT`, then `wait`
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time


def task() -> tuple[dict, str, bool]:
    config = json.loads(os.environ["TF_CONFIG"])
    kind, index = config["task"]["type"], config["task"]["index"]
    label = f"w{index}" if kind == "worker" else kind
    is_chief = kind == "chief" or (label == "w0" and "chief" not in config["cluster"])
    return config, label, is_chief


def report() -> None:
    config, label, is_chief = task()
    keys = ("DISTTRAIN_RUN_ID", "DISTTRAIN_ATTEMPT", "DISTTRAIN_RESULT_FILE",
            "PYTHONUNBUFFERED", "TF_CPP_MIN_LOG_LEVEL", "PYTHONFAULTHANDLER",
            "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
    info = {"label": label, "pid": os.getpid(), "tf_config": config,
            **{k: os.environ.get(k) for k in keys}}
    print("REPORT " + json.dumps(info))
    print(f"stderr line of {label}", file=sys.stderr)
    if is_chief:
        with open(os.environ["DISTTRAIN_RESULT_FILE"], "w") as f:
            json.dump({"best_checkpoint": "ckpt-7", "written_by": label}, f)


def wait(ignore_term: bool = False) -> None:
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else on_term)
    print(f"ready pid={os.getpid()}", flush=True)
    while True:
        time.sleep(60)


def fail(label: str, code: int, ignore_term: bool = False) -> None:
    if task()[1] != label:
        wait(ignore_term)
    time.sleep(0.3)
    print("boom", file=sys.stderr)
    sys.exit(code)


def tf_clash() -> None:
    config, _, _ = task()
    port = config["cluster"]["worker"][config["task"]["index"]].rsplit(":", 1)[1]
    sys.stderr.write(
        "E0000 00:00:1795376631.581638    3428 add_port.cc:83] Failed to add port to "
        f"server: No address added out of total 1 resolved for '0.0.0.0:{port}'\n"
        "E0000 00:00:1795376631.581921    3428 grpc_server_lib.cc:618] UNKNOWN: Could not "
        "start gRPC server\n"
        "tensorflow.python.framework.errors_impl.UnknownError: Could not start gRPC server\n")
    sys.exit(1)


def os_clash() -> None:
    config, _, _ = task()
    host, port = config["cluster"]["worker"][config["task"]["index"]].rsplit(":", 1)
    first = socket.socket()
    first.bind((host, int(port)))
    first.listen()
    socket.socket().bind((host, int(port)))


def listen() -> None:
    config, _, _ = task()
    port = int(config["cluster"]["worker"][config["task"]["index"]].rsplit(":", 1)[1])
    server = socket.socket(socket.AF_INET6)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::", port))
    server.listen()
    print(f"listening {port}", flush=True)
    wait()


def progress(n: int) -> None:
    label = task()[1]
    rng = random.Random(label)
    data = b"".join(f"\rprogress {label} {i:03d}/{n} {'#' * (i % 40)}".encode()
                    for i in range(1, n + 1)) + b"\n"
    while data:
        cut = rng.randint(1, 40)
        os.write(1, data[:cut])
        data = data[cut:]
        if rng.random() < 0.1:
            time.sleep(0.006)


def main(mode: str, *args: str) -> None:
    label = task()[1]
    attempt = os.environ["DISTTRAIN_ATTEMPT"]
    if mode == "report":
        report()
    elif mode == "wait":
        wait()
    elif mode in ("fail", "fail-stubborn"):
        fail(args[0], int(args[1]), ignore_term=mode == "fail-stubborn")
    elif mode == "fail-attempt0":
        report()
        if attempt == "0":
            fail("w1", int(args[0]))
    elif mode == "clash-attempt0":
        if attempt == "0" and label == "w1":
            tf_clash() if args[0] == "tf" else os_clash()
        report()
    elif mode == "always-clash":
        if label == "w1":
            tf_clash()
        wait()
    elif mode == "progress":
        progress(int(args[0]))
    elif mode == "eval-lingers":
        wait() if label == "evaluator" else report()
    elif mode == "eval-fails":
        if label == "evaluator":
            print("eval boom", file=sys.stderr)
            sys.exit(int(args[0]))
        time.sleep(1.5)
        report()
    elif mode == "early-exit":
        if label == "w1":
            print("left training early")
        elif label == args[0]:
            time.sleep(1.0)
            print("UnavailableError: peer w1 is gone", file=sys.stderr)
            sys.exit(int(args[1]))
        else:
            wait()
    elif mode in ("grandchild", "leave-child"):
        child = subprocess.Popen([sys.executable, __file__, "silent"])
        print(f"child pid={child.pid}", flush=True)
        if mode == "grandchild":
            wait()
    elif mode == "silent":
        time.sleep(600)
    elif mode == "listen":
        listen()
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
