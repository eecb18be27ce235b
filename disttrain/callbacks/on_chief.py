"""`on_chief`: run a user's or third-party callback (or a plain function) on the chief only.

Alerts, experiment trackers (W&B, MLflow) and loggers written for one process
run on every worker of a cluster: N alerts, N tracking runs. Wrapped with
`on_chief`, they run on the chief alone, and what could hang instead fails
clearly on every worker (Lightning's `rank_zero_only` hangs there, Lightning
issue 18148).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import keras
from keras.src import utils

from disttrain.callbacks.base import DistributedCallback
from disttrain.coordination import chief_only
from disttrain.errors import CallbackConfigError, ChiefOnlyError
from disttrain.keras_compat import detection

F = TypeVar("F", bound=Callable[..., Any])

# Hooks shared with every worker at the epoch end's one exchange; every other hook the wrapped
# callback defines costs an exchange per call.
_EPOCH_END = "on_epoch_end"
_HOOKS = (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
    "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
    "on_predict_batch_begin", "on_predict_batch_end",
)
# Keras's default training batch hooks call these older names: a callback defining only them
# still runs.
_LEGACY = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end"}
# What a chief-only callback must not call on a multi-worker strategy or its model: every
# worker must call them together.
_STRATEGY_COLLECTIVES = ("run", "reduce", "gather", "experimental_distribute_dataset",
                         "distribute_datasets_from_function")
_EXTENDED_COLLECTIVES = ("reduce_to", "batch_reduce_to", "call_for_each_replica")
_MODEL_COLLECTIVES = ("fit", "evaluate", "predict", "train_on_batch", "test_on_batch",
                      "predict_on_batch")


class OnChief(DistributedCallback, keras.callbacks.Callback):
    """Runs a Keras callback on the chief only; made by `on_chief(callback)`.

    The wrapped callback gets its model and params on the chief only, and each
    of its hooks runs there. The chief's outcome of every hook the callback
    defines reaches every worker: at the end of an epoch in the one exchange
    that ends it (no cost of its own), at other hooks in one exchange per call
    (so prefer epoch hooks for per-batch work: a batch hook costs an exchange
    per batch). So an exception raised in the callback is raised on every
    worker, and a call that every worker must make together, made from inside
    it, raises `ChiefOnlyError` on every worker at once instead of hanging
    (any exception of the callback is raised on the other workers as
    `ChiefOnlyError` with the chief's message):
    a disttrain agreement, and on a multi-worker strategy `strategy.run`,
    `reduce`, `gather`, the extended `reduce_to` / `batch_reduce_to`, and the
    model's `fit`, `evaluate`, `predict` and `*_on_batch`. A collective already
    compiled into a `tf.function` cannot be seen; then the other workers give
    up after the coordination timeout (`DISTTRAIN_COORDINATION_TIMEOUT`) with
    an error naming this callback.

    A stop the callback asks for (`model.stop_training = True`) is agreed at
    the epoch end as every stop is, so every worker stops.

    Attributes:
        callback: the wrapped callback.
    """

    def __init__(self, callback: keras.callbacks.Callback):
        super().__init__()
        if isinstance(callback, DistributedCallback):
            raise CallbackConfigError(
                f"on_chief({type(callback).__name__}): disttrain's callbacks already run on "
                "every worker and agree with each other; run on the chief only, they would "
                "wait for workers that never join. Fix: pass it without on_chief().")
        if not isinstance(callback, keras.callbacks.Callback):
            raise CallbackConfigError(
                f"on_chief({callback!r}): expected a keras.callbacks.Callback or a function. "
                "Fix: pass a callback instance (e.g. on_chief(MyAlert())), or decorate a "
                "function with @on_chief.")
        self.callback = callback
        self._name = f"on_chief({type(callback).__name__})"

    def set_model(self, model) -> None:
        super().set_model(model)
        if self.is_chief:
            self.callback.set_model(model)

    def set_params(self, params) -> None:
        super().set_params(params)
        if self.is_chief:
            self.callback.set_params(params)

    def _call(self, hook: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Runs `hook` of the wrapped callback on the chief; every worker gets its outcome."""
        if all(utils.is_default(getattr(self.callback, h))
               for h in (hook, _LEGACY.get(hook, hook))):
            return
        name = f"{self._name}.{hook}"

        def run() -> None:
            with chief_only.section(name), _collectives_refused(self.model, name):
                getattr(self.callback, hook)(*args, **kwargs)

        if self.coordinator.num_workers == 1:
            run()
        elif hook == _EPOCH_END:
            error = None
            if self.is_chief:
                try:
                    run()
                except Exception as e:  # noqa: BLE001 - raised on every worker in settle
                    error = e

            def settle(per_worker: list[str | None]) -> None:
                if per_worker[0] is not None:
                    raise ChiefOnlyError(per_worker[0]) from error

            self.settle_across_workers(hook, _failure(name, error), settle)
        else:
            self.coordinator.run_on_chief(name, run, ChiefOnlyError)


def _failure(name: str, error: Exception | None) -> str | None:
    """The chief's failure as every worker raises it (None for none)."""
    if error is None or isinstance(error, ChiefOnlyError):
        return None if error is None else str(error)
    return f"{name} failed on the chief: {type(error).__name__}: {error}"


def _hook(name: str) -> Callable[..., None]:
    def hook(self: OnChief, *args: Any, **kwargs: Any) -> None:
        self._call(name, args, kwargs)

    hook.__name__ = name
    hook.__doc__ = f"Runs the wrapped callback's `{name}` on the chief only."
    return hook


for _name in _HOOKS:
    setattr(OnChief, _name, _hook(_name))


class _collectives_refused:
    """While open on a multi-worker strategy, the calls every worker must make together
    (strategy collectives, the model's fit/evaluate/predict) raise `ChiefOnlyError` in
    chief-only code; other threads still get the real method."""

    def __init__(self, model, what: str):
        strategy = getattr(model, "distribute_strategy", None)
        self._targets = []
        if strategy is not None and detection.is_multi_worker(strategy):
            self._targets = [(strategy, _STRATEGY_COLLECTIVES),
                             (strategy.extended, _EXTENDED_COLLECTIVES),
                             (model, _MODEL_COLLECTIVES)]

    def __enter__(self) -> None:
        for owner, names in self._targets:
            for name in names:
                if hasattr(owner, name):
                    object.__setattr__(owner, name, _refusing(owner, name))

    def __exit__(self, *exc: Any) -> None:
        for owner, names in self._targets:
            for name in names:
                if name in vars(owner):
                    object.__delattr__(owner, name)


def _refusing(owner: Any, name: str) -> Callable[..., Any]:
    """`owner.name`, refused inside chief-only code (`chief_only.refuse`)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def refusing(*args: Any, **kwargs: Any) -> Any:
        chief_only.refuse(f"{type(owner).__name__}.{name}()")
        return original(*args, **kwargs)

    return refusing


@overload
def on_chief(target: keras.callbacks.Callback) -> OnChief: ...


@overload
def on_chief(target: F) -> F: ...


def on_chief(target):
    """Runs a callback, or a function, on the chief only (like Lightning's `rank_zero_only`).

    - `on_chief(callback)` wraps a Keras callback (an alert, a W&B / MLflow /
      TensorBoard-like logger): pass the wrapper in `callbacks=[...]` on every
      worker; the callback runs on the chief only (see `OnChief`).
    - `@on_chief` on a function: calling it runs it on the chief only and
      returns its result there (None on the other workers). Call it at the same
      point on every worker, as you would a collective: the chief's outcome is
      shared in one exchange, so an exception in it is raised on every worker
      and a collective called from inside it raises `ChiefOnlyError` everywhere
      instead of hanging. Inside chief-only code (a wrapped callback) it simply
      runs.

    Args:
        target: a `keras.callbacks.Callback` (not one of disttrain's, which
            already coordinate) or a function.

    Returns:
        An `OnChief` callback, or the decorated function.

    Raises:
        CallbackConfigError: `target` is one of disttrain's callbacks, or neither a
            callback nor a function.

    Example:

    ```python
    @disttrain.callbacks.on_chief
    def alert(text):
        requests.post(SLACK_WEBHOOK, json={"text": text})

    class Alert(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["val_loss"] > 1.0:
                alert(f"epoch {epoch + 1}: val_loss {logs['val_loss']:.3f}")

    model.fit(train, validation_data=val, epochs=10, callbacks=[
        disttrain.callbacks.on_chief(Alert()),
        disttrain.callbacks.on_chief(WandbMetricsLogger()),
    ])
    ```
    """
    if isinstance(target, keras.callbacks.Callback) or not callable(target):
        return OnChief(target)
    return _chief_function(target)


def _chief_function(function: F) -> F:
    name = f"on_chief({getattr(function, '__qualname__', function)!r})"

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from disttrain import coordination

        if chief_only.current() is not None:
            return function(*args, **kwargs)
        coordinator = coordination.get()
        result = []

        def run() -> None:
            with chief_only.section(name):
                result.append(function(*args, **kwargs))

        if coordinator.num_workers == 1:
            run()
        else:
            coordinator.run_on_chief(name, run, ChiefOnlyError)
        return result[0] if result else None

    return wrapper
