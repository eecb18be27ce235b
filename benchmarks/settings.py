"""How much each benchmark measures: the full run, `--quick` and the CI `--smoke` run."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and repetitions; every section reads its own fields."""

    name: str
    rounds: int
    """Interleaved rounds of each side-by-side comparison (fresh clusters each)."""
    epochs: int
    """Timed epochs per training cluster (after one untimed warm-up epoch)."""
    steps: int
    """Steps per epoch of the MLP (global batch 256)."""
    collective_calls: int
    """Calls per in-process microbenchmark (votes, all-reduces)."""
    checkpoint_params: tuple[int, ...]
    """Model sizes (parameters) for the checkpoint comparison."""
    checkpoint_rounds: int
    snapshot_params: tuple[int, ...]
    """Model sizes (parameters) of the one-process blocking-time comparison (4 bytes each:
    2.5M is 10 MB of weights, a 30 MB .keras file with Adam's state)."""
    snapshot_rounds: int
    """Rounds of the one-process comparison (each round saves every side once)."""
    fit_params: int
    """Parameters of the model of the 2-worker fit saving every epoch vs not at all."""
    fit_steps: int
    """Steps per epoch of that fit (its epochs: `epochs + 1`, the first untimed)."""
    launcher_rounds: int
    """Interleaved rounds of the launcher comparison (worker start-up times vary by
    tenths of a second, the effect measured is under a tenth)."""
    demo_epochs: int
    """Fixed epochs of the early-stopping comparison (the issue asks for 80)."""
    scaling_workers: tuple[int, ...]
    scale_workers: tuple[int, ...]
    """Worker counts of the `--scale` section (local processes sharing the cores)."""
    input_megabytes: tuple[int, ...] = (100, 1000)
    """Sizes of the NumPy arrays whose input check is timed (each worker holds its copy)."""


FULL = Settings("full", rounds=5, epochs=3, steps=30, collective_calls=200,
                checkpoint_params=(200_000, 25_000_000), checkpoint_rounds=15,
                snapshot_params=(2_500_000, 25_000_000, 250_000_000), snapshot_rounds=5,
                fit_params=2_500_000, fit_steps=20, launcher_rounds=9,
                demo_epochs=80, scaling_workers=(1, 2, 4),
                scale_workers=(2, 4, 8, 12, 16))
QUICK = Settings("quick", rounds=2, epochs=2, steps=20, collective_calls=100,
                 checkpoint_params=(200_000, 25_000_000), checkpoint_rounds=3,
                 snapshot_params=(2_500_000, 25_000_000), snapshot_rounds=3,
                 fit_params=2_500_000, fit_steps=10, launcher_rounds=2,
                 demo_epochs=30, scaling_workers=(1, 2, 4),
                 scale_workers=(2, 4, 8, 12, 16))
SMOKE = Settings("smoke", rounds=1, epochs=1, steps=3, collective_calls=5,
                 checkpoint_params=(20_000,), checkpoint_rounds=1, snapshot_params=(20_000,),
                 snapshot_rounds=1, fit_params=20_000, fit_steps=3,
                 launcher_rounds=1, demo_epochs=3,
                 scaling_workers=(1, 2), scale_workers=(2,), input_megabytes=(10,))
