"""The register of Keras/TensorFlow patches: every replacement is listed, once, in order;
the wrapper chains; the table in docs/architecture.md. One process, no cluster."""

from __future__ import annotations

import re

import pytest

from disttrain.testing import run_cluster
from tests.keras_compat import register_workloads
from tests.support import REPO_ROOT

TRAINER = "keras.src.backend.tensorflow.trainer.TensorFlowTrainer"
CALLBACK_LIST = "keras.src.callbacks.callback_list.CallbackList"
CHAINS = {
    f"{CALLBACK_LIST}.on_epoch_end":
        ["step_timing_recorder", "stop_agreement", "synced_batchnorm_statistics"],
    f"{CALLBACK_LIST}.on_train_batch_end": ["step_timing_recorder", "stop_agreement"],
    f"{TRAINER}.evaluate": ["call_checks", "synced_batchnorm_statistics"],
    f"{TRAINER}.predict": ["call_checks", "synced_batchnorm_statistics"],
    f"{TRAINER}.fit": ["call_checks"],
}
"""Who wraps each hook, outermost (called first) to innermost."""
TABLE = re.compile(r"<!-- patches -->\n(.*?)\n<!-- /patches -->", re.S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    timing = tmp_path_factory.mktemp("register") / "timing.json"
    run = run_cluster(register_workloads.install_everything, 1,
                      kwargs={"timing_file": str(timing)}, timeout=180).assert_ok()
    return run.results[0]


def test_every_replacement_goes_through_the_register(installed):
    """Every Keras/TensorFlow function that differs after all installs is registered,
    and every registered one was replaced."""
    assert installed["unregistered"] == [], "replaced outside keras_compat/_patch.wrap"
    assert installed["missing"] == []


def test_installing_again_changes_nothing(installed):
    assert installed["after_reinstalls"] == installed["patches"]


def test_the_wrapper_chains_in_order(installed):
    chains = installed["chains"]
    assert {target: chains[target] for target in CHAINS} == CHAINS
    broken = {target: chain for target, chain in chains.items() if isinstance(chain, str)}
    assert broken == {}


def test_the_architecture_page_lists_every_patch(installed):
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    match = TABLE.search(page)
    assert match is not None, "docs/architecture.md has no <!-- patches --> table"
    assert match.group(1) == installed["table"], (
        "docs/architecture.md's patch table differs from keras_compat.patches(); paste:\n"
        + installed["table"])


def test_wrap_refuses_a_second_wrap_and_chain_finds_a_bypass():
    """On a class of its own (no TensorFlow): one wrap per module, the last wrap runs
    first, and a replacement made outside the register breaks the chain loudly."""
    from disttrain.keras_compat import _patch

    class Owner:
        def hook(self) -> list[str]:
            return ["original"]

    def layer(name: str):
        def make(original):
            def wrapper(self) -> list[str]:
                return [name, *original(self)]

            return wrapper

        return make

    first = _patch.wrap(Owner, "hook", layer("a"), by="test_a")
    assert _patch.wrap(Owner, "hook", layer("again"), by="test_a") is first
    _patch.wrap(Owner, "hook", layer("b"), by="test_b")
    assert Owner().hook() == ["b", "a", "original"]
    assert _patch.chain(Owner, "hook") == ["test_b", "test_a"]
    assert _patch.installed("test_a") and not _patch.installed("test_c")
    Owner.hook = layer("outside")(Owner.hook)
    with pytest.raises(LookupError, match="replaced outside the register"):
        _patch.chain(Owner, "hook")
