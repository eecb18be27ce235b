"""Running benchmark functions on real localhost clusters (`disttrain.testing.run_cluster`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

from disttrain.testing import run_cluster


class BenchmarkError(RuntimeError):
    """A benchmark cluster failed; the message holds every worker's output tail."""


def on_cluster(fn: Callable[..., Any], workers: int, kwargs: Mapping[str, Any] | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 600) -> list[Any]:
    """Runs module-level `fn(**kwargs)` on `workers` fresh processes; returns each result."""
    run = run_cluster(fn, workers, kwargs=kwargs, env=env, timeout=timeout)
    try:
        run.assert_ok()
    except AssertionError as e:
        raise BenchmarkError(f"{fn.__qualname__} on {workers} worker(s) failed:\n{e}") from None
    return run.results


TF_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1"}
TF_KERAS_MISSING = "tf_keras not installed (pip install '.[bench]')"


def has_tf_keras() -> bool:
    """Whether the tf_keras peer can run (it is in the `bench` extra, not a dependency)."""
    return importlib.util.find_spec("tf_keras") is not None
