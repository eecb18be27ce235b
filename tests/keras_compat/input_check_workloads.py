"""Worker functions: inputs that TensorFlow shards by element (seeded or not) or not at all."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from tests.support.cases import run_cases
from tests.support.models import dense_model

GLOBAL_BATCH = 8
SAMPLES = 64
STEP_MARK = "input_check_workloads: a training step began"
REFUSED_CALLS = ("validation", "evaluate", "predict")
"""The calls `refused` runs in `shared_cases` (`fit` refuses in a cluster of its own, whose
workers then exit nonzero)."""
_steps_begun = [0]
"""Training steps begun in this process, by every `run`."""


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def dataset(kind: str, rank: int, num_workers: int):
    """The global-batch input of `kind`:

    - `"unseeded"`: `shuffle` without a seed, a new order in each process (AUTO
      sharding falls back to DATA: checked, and different on every worker);
    - `"seeded"`: the same shuffle with a seed (checked, identical);
    - `"file"`: text files read with `TextLineDataset`, then an unseeded shuffle (AUTO
      shards by file: not checked);
    - `"off"`: each worker's own shard, `AutoShardPolicy.OFF`, unseeded shuffle
      (not checked);
    - `"own_shard"`: each worker's own shard left to AUTO, which TensorFlow shards again
      (checked, and different on every worker).
    """
    import tensorflow as tf

    x, y = _data()
    if kind == "file":
        directory = tempfile.mkdtemp(prefix=f"input-check-w{rank}-")
        for part in range(4):
            with open(os.path.join(directory, f"part{part}.csv"), "w") as f:
                for row, target in zip(x[part::4], y[part::4]):
                    f.write(",".join(str(v) for v in [*row, *target]) + "\n")
        files = sorted(os.path.join(directory, name) for name in os.listdir(directory))
        values = (tf.data.Dataset.from_tensor_slices(files).interleave(tf.data.TextLineDataset)
                  .map(lambda line: tf.strings.to_number(tf.strings.split(line, ","))))
        return values.map(lambda v: (v[:4], v[4:])).shuffle(SAMPLES).batch(GLOBAL_BATCH)
    pairs = tf.data.Dataset.from_tensor_slices((x, y))
    if kind == "unseeded":
        return pairs.shuffle(SAMPLES).batch(GLOBAL_BATCH)
    if kind == "seeded":
        return pairs.shuffle(SAMPLES, seed=7).batch(GLOBAL_BATCH)
    if kind == "off":
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return (pairs.shard(num_workers, rank).shuffle(SAMPLES).batch(GLOBAL_BATCH)
                .with_options(options))
    if kind == "own_shard":
        return pairs.shard(num_workers, rank).batch(GLOBAL_BATCH)
    raise ValueError(f"unknown kind {kind!r}")


def run(kind: str, call: str = "fit", skip: tuple[str, ...] = ()) -> dict:
    """`call` with the input of `kind` (see `dataset`): `"fit"` trains on it,
    `"validation"` trains on the seeded input and validates on it, `"evaluate"` and
    `"predict"` run on it, `"all"` does each of these in turn; `"checks"` fits one
    epoch of the seeded input in batches of 3 (the preflight warns: not divisible by
    2 replicas), then one of `kind`. Prints `STEP_MARK` before every training step.
    `skip` goes to `keras_compat.apply(skip=...)`.

    Returns each call's history or result (for `"checks"`: the `PreflightWarning`s
    seen and the `InputMismatchError`'s message or None), and the training steps run."""
    import keras

    from disttrain import coordination, keras_compat
    from disttrain.distribute import strategy as make_strategy

    if skip:
        keras_compat.apply(skip=tuple(skip))
    strategy = make_strategy()
    coord = coordination.get()
    with strategy.scope():
        # No global seed: it would make the unseeded shuffle the same in every process.
        model = dense_model(4, kernel_initializer="zeros")
        model.compile(keras.optimizers.SGD(0.05), "mse")
    steps_before = _steps_begun[0]

    class MarkSteps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            _steps_begun[0] += 1
            print(STEP_MARK, flush=True)

    def data(which: str):
        return dataset(which, coord.rank, coord.num_workers)

    result: dict = {}
    calls = ("fit", "validation", "evaluate", "predict") if call == "all" else (call,)
    for name in calls:
        if name == "fit":
            result["fit"] = model.fit(data(kind), epochs=3, verbose=0,
                                      callbacks=[MarkSteps()]).history
        elif name == "validation":
            result["validation"] = model.fit(data("seeded"), validation_data=data(kind),
                                             epochs=2, verbose=0, callbacks=[MarkSteps()]).history
        elif name == "evaluate":
            result["evaluate"] = model.evaluate(data(kind), verbose=0, return_dict=True)
        elif name == "predict":
            result["predict"] = model.predict(data(kind), verbose=0).tolist()
        else:
            result["checks"] = _checks(model, data(kind))
    result["steps"] = _steps_begun[0] - steps_before
    return result


def refused(call: str, kind: str = "unseeded") -> dict:
    """`run(kind, call)`, which must raise InputMismatchError: its message (None if
    nothing raised), the training steps begun and the seconds until it raised."""
    from disttrain.errors import InputMismatchError

    steps_before, started = _steps_begun[0], time.monotonic()
    try:
        run(kind, call)
    except InputMismatchError as e:
        return {"error": f"{type(e).__name__}: {e}", "steps": _steps_begun[0] - steps_before,
                "seconds": time.monotonic() - started}
    return {"error": None, "steps": _steps_begun[0] - steps_before}


def shared_cases() -> dict:
    """The 2-worker cases with every check on, in one cluster (tests/support/cases.py):
    the unseeded input refused in each of `REFUSED_CALLS`, a worker's own shard left to
    TensorFlow's sharding refused in `fit`, then the seeded input through
    every call and the file-sharded and unsharded inputs trained."""
    return run_cases({
        **{f"refused_{call}": (lambda call=call: refused(call)) for call in REFUSED_CALLS},
        "refused_own_shard": lambda: refused("fit", "own_shard"),
        "seeded": lambda: run("seeded", "all"),
        **{kind: (lambda kind=kind: run(kind, "fit")) for kind in ("file", "off")},
    })


def _checks(model, unseeded) -> dict:
    import warnings

    import tensorflow as tf

    from disttrain.errors import InputMismatchError, PreflightWarning

    x, y = _data()
    indivisible = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(SAMPLES, seed=7).batch(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(indivisible, epochs=1, verbose=0)
    mismatch = None
    try:
        model.fit(unseeded, epochs=1, verbose=0)
    except InputMismatchError as e:
        mismatch = str(e)
    return {"preflight": [str(w.message) for w in caught
                          if issubclass(w.category, PreflightWarning)],
            "input_mismatch": mismatch}
