"""The later-batch check: every batch a generator or `PyDataset` feeds is the same on every worker.

Each worker reads the whole generator or `PyDataset` and trains its part of every
batch, so the workers train one process's batches only if their copies yield the
same batches at every step. The input check at the call's start compares the first
batch (a `PyDataset`'s first and last, at each epoch); a generator that reads a
per-worker random stream, or a file list sharded by accident, can agree there and
differ later, and the workers then train on a mix of batches no process would see.

So each worker hashes every batch its generator or `PyDataset` yields to Keras
(BLAKE2b of the batch's bytes, in tf.data's reader thread), and at the end of each
epoch (and of `evaluate` / `predict`) the workers exchange the hashes of the steps
trained since the last exchange in one gather. A difference raises
`LaterBatchMismatchError` (an `InputMismatchError`) on every worker, naming the
input, the epoch, the first differing step and the fix, before the next epoch
starts. A generator that runs out on one worker while another's still yields
(TensorFlow then trains the others' batches alone) counts as a difference at the
step where it ran out. A `validation_data` generator or `PyDataset` of `fit` is
hashed the same way and compared at the end of each validation pass, step by step
from that pass's first batch (Keras reads it anew at each pass). Every worker makes
the same exchanges whatever its input yields, so a difference never hangs. Part of
`input_check` (skipped with it); see `docs/parity.md#later-batches`.

Example:

```python
model.fit(batches_from_files(), steps_per_epoch=100, epochs=5,   # checked at each epoch's end
          validation_data=val_batches(), validation_steps=10)  # and at each validation's end
```
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from disttrain.errors import LaterBatchMismatchError
from disttrain.keras_compat import _patch
from disttrain.keras_compat.digest import batch_digest

NAME = "later_batches"
RAN_OUT = "ran out"
"""What a worker whose generator ended reports for the steps after its end."""

_recording: dict[int, Ledger] = {}
"""`id(PyDataset)` → its ledger, while a checked call runs."""


class Ledger:
    """The hashes of the batches one input yielded on this worker, in order.

    Args:
        name: the argument that holds the input (`"x"`, `"validation_data"`), for
            the message.
        kind: `"generator"` or `"pydataset"`.
        validation: whether it is `fit`'s validation input: Keras reads it anew at
            each validation pass (dropping what its reader read ahead), so each
            `read` starts a new pass whose steps count from its first batch.
    """

    def __init__(self, name: str, kind: str, validation: bool = False) -> None:
        self.name, self.kind, self.validation = name, kind, validation
        self._lock = threading.Lock()
        self._digests: list[str] = []
        self._first = 0  # the step of `_digests[0]`: earlier ones were compared
        self._ended: int | None = None

    def read(self, batches: Iterator[Any], ends: bool) -> Iterator[Any]:
        """`batches`, each hashed as it is yielded; `ends`: its end is the input's end
        (a generator; a `PyDataset` starts a new pass)."""
        with self._lock:
            if self.validation:  # a new pass; a reader of the last one keeps its own list
                self._digests, self._first, self._ended = [], 0, None
            digests = self._digests
        for batch in batches:
            digest = batch_digest(batch)
            with self._lock:
                digests.append(digest)
            yield batch
        if ends:
            with self._lock:
                if digests is self._digests:
                    self._ended = self._first + len(digests)

    def take(self, steps: int) -> tuple[int, list[str]]:
        """The hashes of the steps from the first not yet taken up to `steps` (each
        worker's trained steps), and the first one's step; forgets them."""
        with self._lock:
            first, count = self._first, max(0, steps - self._first)
            seen = self._digests[:count]
            ended = self._ended
            seen += [RAN_OUT if ended is not None and first + i >= ended else "not read"
                     for i in range(len(seen), count)]
            del self._digests[:count]
            self._first += count
        return first, seen


def record(inputs: dict[str, Any], kinds: dict[str, str]) -> tuple[dict[str, Any], list[Ledger]]:
    """Ledgers for the generators and `PyDataset`s of a call, and the generators to pass
    on in place of the given ones (each batch of `x` hashed as it is yielded; a
    `validation_data` generator is hashed where Keras starts each pass over it).

    Args:
        inputs: argument name → value (a generator as the input check put it back).
        kinds: argument name → the input check's kind of it.

    Returns:
        The replacements (argument name → generator) and the ledgers.
    """
    replaced, ledgers = {}, []
    for name, kind in kinds.items():
        if kind not in ("generator", "pydataset"):
            continue
        ledger = Ledger(name, kind, validation=name == "validation_data")
        ledgers.append(ledger)
        if kind == "generator" and not ledger.validation:
            replaced[name] = ledger.read(inputs[name], ends=True)
        else:
            _recording[id(inputs[name])] = ledger
    return replaced, ledgers


def stop_recording(inputs: dict[str, Any]) -> None:
    """Forgets the ledgers of a call's `PyDataset`s (at the call's end)."""
    for value in inputs.values():
        _recording.pop(id(value), None)


def install() -> None:
    """Hashes the batches of a recorded `PyDataset` or validation generator as Keras
    reads them; once per process, by the `call_checks` hook."""
    from keras.src.trainers.data_adapters.generator_data_adapter import (  # private: keras.src
        GeneratorDataAdapter,
    )
    from keras.src.trainers.data_adapters.py_dataset_adapter import (  # private: keras.src
        PyDatasetAdapter,
    )

    _patch.wrap(PyDatasetAdapter, "_get_iterator", _recorded_passes,  # private: keras
                by=NAME)
    _patch.wrap(GeneratorDataAdapter, "__init__", _recorded_generator, by=NAME)


def _recorded_passes(get_iterator: Callable) -> Callable:
    @functools.wraps(get_iterator)
    def wrapper(self):
        batches = get_iterator(self)
        ledger = _recording.get(id(self.py_dataset))
        return batches if ledger is None else ledger.read(batches, ends=False)

    return wrapper


def _recorded_generator(init: Callable) -> Callable:
    @functools.wraps(init)
    def wrapper(self, generator, *args, **kwargs):
        init(self, generator, *args, **kwargs)
        ledger = _recording.get(id(generator))
        if ledger is not None:
            passes = self.generator  # private: keras; each pass's batches, peeked ones first
            self.generator = lambda: ledger.read(passes(), ends=True)

    return wrapper


def callback(call: str, ledgers: list[Ledger]):
    """The Keras callback that exchanges the ledgers' new hashes at the end of each
    epoch of `fit` and of each of its validation passes (and at the end of `evaluate` /
    `predict`) and raises on a difference.

    Args:
        call: `"fit"`, `"evaluate"` or `"predict"`.
        ledgers: the call's ledgers (`record`).
    """
    import keras

    trained = [ledger for ledger in ledgers if not ledger.validation]
    validation = [ledger for ledger in ledgers if ledger.validation]

    class CompareLaterBatches(keras.callbacks.Callback):
        """Counts the call's steps; compares the workers' batches of those steps."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch, self.epoch_start, self.steps, self.validated = 1, 0, 0, 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.epoch_start = epoch + 1, self.steps

        def on_epoch_end(self, epoch, logs=None):
            if trained:
                compare(call, trained, self.steps, self.epoch, self.epoch_start)

        def on_train_batch_end(self, batch, logs=None):
            self.steps = self.epoch_start + batch + 1

        def on_test_begin(self, logs=None):
            self.validated = 0

        def on_test_batch_end(self, batch, logs=None):
            if call == "evaluate":
                self.steps = batch + 1
            self.validated = batch + 1

        def on_predict_batch_end(self, batch, logs=None):
            self.steps = batch + 1

        def on_test_end(self, logs=None):
            if call == "evaluate":
                compare(call, ledgers, self.steps, 1, 0)
            elif validation:
                compare(call, validation, self.validated, self.epoch, 0)

        def on_predict_end(self, logs=None):
            compare(call, ledgers, self.steps, 1, 0)

    return CompareLaterBatches()


def compare(call: str, ledgers: list[Ledger], steps: int, epoch: int, epoch_start: int) -> None:
    """Exchanges the hashes of each ledger's steps up to `steps` in one gather and raises
    on every worker when they differ. Every worker must call it at the same point.

    Args:
        call: `"fit"`, `"evaluate"` or `"predict"`, for the message.
        ledgers: this worker's ledgers, in the same order on every worker.
        steps: the steps the call trained (evaluated, predicted) so far.
        epoch: the epoch that ends (1 for the first), for the message.
        epoch_start: the steps before that epoch.

    Raises:
        LaterBatchMismatchError: a step's batch differs between workers.
    """
    from disttrain import coordination

    local = [ledger.take(steps) for ledger in ledgers]
    site = f"keras_compat.{NAME}.{call}" + (".validation" if ledgers[0].validation else "")
    peers = [json.loads(v) for v in coordination.get().gather(site, json.dumps(local))]
    for index, ledger in enumerate(ledgers):
        first, _ = peers[0][index]
        seen = [peer[index][1] for peer in peers]
        differing = next((i for i, hashes in enumerate(zip(*seen))
                          if any(h != hashes[0] for h in hashes)), None)
        if differing is not None:
            step = first + differing
            raise LaterBatchMismatchError(_message(
                call, ledger, epoch, step - epoch_start + 1, steps - step,
                [hashes[differing] for hashes in seen]))


def _message(call: str, ledger: Ledger, epoch: int, step: int, trained: int,
             seen: list[str]) -> str:
    what = "generator" if ledger.kind == "generator" else "PyDataset"
    done = {"fit": "trained", "evaluate": "evaluated"}.get(call, "predicted")
    workers = "; ".join(f"worker {rank}: {s}" for rank, s in enumerate(seen))
    where = f"epoch {epoch}, step {step}" if call == "fit" else f"step {step}"
    end = "the epoch's" if call == "fit" else "the call's"
    decided = ""
    if ledger.validation:
        done, end = "evaluated", "the validation pass's"
        where = f"the validation of epoch {epoch}, step {step}"
        decided = " (the val_ metrics, and the callbacks deciding on them, saw that mix)"
    ran_out = (" It ran out on one worker but not on another: TensorFlow then goes on "
               "with the other workers' batches alone."
               if RAN_OUT in seen else "")
    return (
        f"{call}: the {what} {ledger.name!r} yielded a different batch on each worker at "
        f"{where} ({workers}); its first batch agreed.{ran_out} Each "
        f"worker reads the whole {what} and {done} its part of every batch, so the workers "
        f"{done} {trained} step(s) on a mix of batches no single process would see before "
        f"this check at {end} end stopped them{decided}. Likely cause: the {what} reads a "
        "random stream each process draws separately (an unseeded np.random / random / "
        "tf.random draw, a shuffled file list), a per-worker part "
        "of the data (files or rows split by worker index), or data of another length. "
        "Fix: make every worker yield the same batches in the same order and number (a "
        "common seed: keras.utils.set_random_seed(S) on every worker, "
        "np.random.default_rng(S)); TensorFlow splits each batch between the workers "
        "itself. To skip the input checks: DISTTRAIN_INPUT_CHECK=0 on every worker."
    )
