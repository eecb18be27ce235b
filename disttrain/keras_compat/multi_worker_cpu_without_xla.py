"""Fix `multi_worker_cpu_without_xla`: `compile(jit_compile=True)` on CPU workers.

XLA cannot compile the collectives of a multi-worker step on CPU devices; the
model then runs without XLA, with a warning, as Keras does for a model that does
not support XLA. See `docs/keras_compat.md#multi_worker_cpu_without_xla`.
"""

from __future__ import annotations

import functools
import warnings

from disttrain.keras_compat import _patch, detection

NAME = "multi_worker_cpu_without_xla"
UPSTREAM = "tensorflow b/194942685 (XLA has no collectives on CPU devices)"

_MAKERS = ("make_train_function", "make_test_function", "make_predict_function")


def is_needed() -> bool:
    """Whether Keras compiles the step it runs across replicas with `jit_compile`.

    Raises:
        detection.TargetNotFound: the trainer's `_make_function` or one of its
            `make_*_function` methods is missing.
    """
    trainer = detection.trainer_class()
    for name in _MAKERS:
        detection.find(trainer, name)
    return detection.source_contains(detection.find(trainer, "_make_function"),  # private: keras
                                     "jit_compile=self.jit_compile")


def install() -> None:
    """Wraps the trainer's `make_train_function`, `make_test_function` and
    `make_predict_function`."""
    trainer_class = detection.trainer_class()
    for name in _MAKERS:
        _patch.wrap(trainer_class, name, _without_xla_on_cpu, by=NAME)


def _without_xla_on_cpu(make_function):
    @functools.wraps(make_function)
    def wrapper(self, *args, **kwargs):
        strategy = self.distribute_strategy
        if (self.jit_compile and detection.is_multi_worker(strategy)
                and any("CPU" in device for device in strategy.extended.worker_devices)):
            warnings.warn(
                "disttrain: compile(jit_compile=True) on CPU workers under multi-worker "
                "MultiWorkerMirroredStrategy: XLA cannot compile the collectives of a step "
                "on CPU devices ('Collectives are not yet implemented for CPU devices when "
                "compiling with XLA'). Proceeding with jit_compile=False. Fix: compile with "
                "jit_compile=False to silence this, or train on GPUs.", stacklevel=2)
            self.jit_compile = False
        return make_function(self, *args, **kwargs)

    return wrapper
