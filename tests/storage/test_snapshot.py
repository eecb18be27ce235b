"""Snapshot, then write (`storage.snapshot.ModelSnapshot`, `ModelCheckpoint(async_commit=True)`):
the file written later holds the state of the step the save was asked at, and saves do not
accumulate memory."""

from __future__ import annotations

import os
import resource
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from disttrain import callbacks  # noqa: E402
from disttrain.storage.snapshot import ModelSnapshot  # noqa: E402
from tests.support.models import dense_model  # noqa: E402


def _trained_model(units: int = 16):
    model = dense_model(8, [units], batchnorm=True, seed=1)
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    model.fit(x, x[:, :1], epochs=1, verbose=0)
    return model, x


def _state(model) -> list[np.ndarray]:
    return [np.asarray(v) for v in model.weights + model.optimizer.variables]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.timeout(120)
def test_a_snapshot_writes_the_state_of_its_step_after_training_moved_on(tmp_path):
    """The snapshot is taken, training runs more steps, then the file is written: it loads
    exactly as a synchronous save taken at the snapshot's step (weights, optimizer state,
    BatchNormalization statistics, config), not as the model is now."""
    model, x = _trained_model()
    snapshots = {"keras": ModelSnapshot.take(model),
                 "weights": ModelSnapshot.take(model, weights_only=True)}
    model.save(tmp_path / "sync.keras")
    at_snapshot = _state(model)
    model.fit(x, x[:, :1], epochs=2, verbose=0)  # training moves on
    assert not _same(_state(model), at_snapshot)
    snapshots["keras"].write(str(tmp_path / "async.keras"))
    snapshots["weights"].write(str(tmp_path / "async.weights.h5"))

    sync = keras.saving.load_model(tmp_path / "sync.keras")
    later = keras.saving.load_model(tmp_path / "async.keras")
    assert _same(_state(later), _state(sync)) and _same(_state(later), at_snapshot)
    assert later.get_config() == sync.get_config()
    names = [zipfile.ZipFile(tmp_path / n).namelist() for n in ("sync.keras", "async.keras")]
    assert names[0] == names[1]
    weights_only, _ = _trained_model()
    weights_only.load_weights(tmp_path / "async.weights.h5")
    assert _same([np.asarray(w) for w in weights_only.weights], at_snapshot[:len(model.weights)])


@pytest.mark.timeout(120)
def test_async_checkpoints_of_a_fit_equal_synchronous_ones_of_the_same_epoch(tmp_path):
    model, x = _trained_model()
    sync = callbacks.ModelCheckpoint(str(tmp_path / "sync" / "m-{epoch}.keras"))
    later = callbacks.ModelCheckpoint(str(tmp_path / "async" / "m-{epoch}.keras"),
                                      async_commit=True)
    model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[later, sync])
    for epoch in (1, 2, 3):
        a, b = (keras.saving.load_model(tmp_path / side / f"m-{epoch}.keras")
                for side in ("sync", "async"))
        assert _same(_state(a), _state(b)), epoch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["ModelCheckpoint", "BackupAndRestore"])
def test_fifty_async_saves_do_not_grow_memory(tmp_path, kind):
    """12 MB of state per snapshot (weights and Adam's two moments): keeping every
    snapshot would add 480 MB. The last file holds the final state."""
    model = dense_model(1000, outputs=1000)
    model.compile("adam", "mse")
    model.optimizer.build(model.trainable_variables)
    if kind == "ModelCheckpoint":
        checkpoint = callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), async_commit=True)
        save = lambda step: checkpoint.on_epoch_end(step, {"val_loss": 1.0})  # noqa: E731
    else:
        checkpoint = callbacks.BackupAndRestore(str(tmp_path), save_freq=1,
                                                delete_checkpoint=False, async_commit=True)
        save = checkpoint.on_train_batch_end
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    rss = []
    x = np.ones((4, 1000), "float32")
    for step in range(50):
        model.train_on_batch(x, x)  # a snapshot read shares buffers until the next update
        save(step)
        if step in (9, 49):
            checkpoint._manager.wait()
            rss.append(_rss_mb())
    checkpoint.on_train_end()
    assert rss[1] - rss[0] < 40, rss
    if kind == "ModelCheckpoint":
        assert sorted(os.listdir(tmp_path)) == ["best.json", "m.keras"]
        saved = keras.saving.load_model(tmp_path / "m.keras")
    else:
        assert os.listdir(tmp_path) == ["backup-000049"]
        saved = keras.models.clone_model(model)
        saved.compile("adam", "mse")
        saved.optimizer.build(saved.trainable_variables)
        saved.load_weights(tmp_path / "backup-000049" / "model.weights.h5")
    assert _same(_state(saved), _state(model))
