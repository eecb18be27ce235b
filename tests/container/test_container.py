"""The image, built and run: docker/Dockerfile built with podman (CPU-only TensorFlow, from a
registry-free base: tests/support/podman.py) and run as the two pods of the Indexed Job that
`python -m launch.k8s` generates, which train the bundled demo.

Installs podman with apt-get where it is missing (root); skips, saying why, where it cannot.
Cold (nothing installed, no base image, no layers cached) the set-up takes about 3 minutes,
mostly waiting on the network: tests/conftest.py starts it in the background when the session
starts and runs this test last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.support import REPO_ROOT
from workloads import k8s_pods

pytestmark = [pytest.mark.container, pytest.mark.slow]

JOB = "disttrain-demo"
CHECKPOINTS = "/checkpoints"
EPOCHS = 3
LOAD_AND_EVALUATE = """\
import sys
import keras
from disttrain.demo import datasets
model = keras.saving.load_model(sys.argv[1])
print("ACCURACY", model.evaluate(datasets(64)[1], verbose=0, return_dict=True)["accuracy"])
"""


def _manifests(image: str) -> list[dict]:
    argv = [sys.executable, "-m", "launch.k8s", "--name", JOB, "--workers", "2",
            "--image", image, "--checkpoint-url", CHECKPOINTS, "--peer-timeout", "120",
            "--env", "TF_CPP_MIN_LOG_LEVEL=3", "--",
            "python", "-m", "disttrain.demo", "--epochs", str(EPOCHS),
            "--output-dir", "$(DISTTRAIN_CHECKPOINT_URL)"]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.timeout(1800)
def test_image_trains_the_demo_as_the_pods_of_the_generated_indexed_job(tmp_path,
                                                                        container_image):
    """Both pods exit 0; only index 0 writes (index 1's mount of the shared checkpoint volume
    is read-only: a write there would fail its run), and its best checkpoint loads in the
    image and scores the accuracy the chief reported for it."""
    engine, image = container_image.engine, container_image.image
    times = dict(container_image.times)
    started = time.monotonic()

    shared = tmp_path / "checkpoints"
    shared.mkdir()
    shared.chmod(0o777)  # the image's user (uid 1000) writes here
    volumes = [[f"{shared}:{CHECKPOINTS}"], [f"{shared}:{CHECKPOINTS}:ro"]]
    with engine.indexed_job(_manifests(image), image, volumes) as pods:
        codes = pods.wait(timeout=600)
        logs = [pods.logs(i) for i in range(2)]
    times["job"] = time.monotonic() - started
    assert codes == [0, 0], "\n----- pod 1:\n".join(logs)

    summary = dict(re.findall(r"^  (\w+) +(.+)$", logs[0], re.MULTILINE))
    assert summary["workers"] == "2" and summary["epochs_run"] == str(EPOCHS), logs[0]
    assert summary["run_id"] == k8s_pods.OWNER_UID, "the run id is the Job's UID label"
    assert "disttrain demo summary" not in logs[1], "only the chief prints the summary"
    assert "Read-only file system" not in logs[1], "index 1 tried to write"
    assert [p.name for p in shared.iterdir()] == [k8s_pods.OWNER_UID]
    run_dir = shared / k8s_pods.OWNER_UID
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["path"] == summary["best_checkpoint"]
    assert best["path"].startswith(f"{CHECKPOINTS}/{k8s_pods.OWNER_UID}/checkpoints/")

    evaluated = engine("run", "--rm", "--network", "none", "--volume",
                       f"{shared}:{CHECKPOINTS}:ro", "--entrypoint", "python", image,
                       "-c", LOAD_AND_EVALUATE, best["path"], timeout=300).stdout
    accuracy = float(re.search(r"^ACCURACY (\S+)$", evaluated, re.MULTILINE)[1])
    assert accuracy == pytest.approx(float(summary["best_val_accuracy"]), abs=1e-3)
    times["load"] = time.monotonic() - started - times["job"]
    size = engine.image_size(image) / 1e9
    print(f"image {image}: {size:.2f} GB;",
          ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in times.items()))
