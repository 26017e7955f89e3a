"""Sweeps: a base experiment times a grid of overrides, one MLflow child run per point.

`spec` reads and checks sweep files (the format is described there); `runner` runs their
points as `tinytale train` processes: `plan` decides what each point does (skip, resume, run
afresh), `executor` carries that out and records every outcome, `protocol` is the contract
with a point's process, `containers` runs points in the compose stack, and `results` is what
a sweep reports.
"""

from tinytale.sweep.results import MAX_EXIT_FAILED, PointResult, SweepResult, render_results
from tinytale.sweep.runner import (
    point_config_hash,
    resumable_point,
    run_sweep,
    sweep_experiment,
)
from tinytale.sweep.spec import (
    RESERVED_KEYS,
    SWEEP_KEYS,
    SweepError,
    SweepPoint,
    SweepSpec,
    expand_grid,
    known_keys,
    load_sweep,
    overrides_key,
    point_run_name,
    resolved_overrides,
)

__all__ = [
    "MAX_EXIT_FAILED", "RESERVED_KEYS", "SWEEP_KEYS", "PointResult", "SweepError", "SweepPoint",
    "SweepResult", "SweepSpec", "expand_grid", "known_keys", "load_sweep",
    "overrides_key", "point_config_hash", "point_run_name", "render_results",
    "resolved_overrides", "resumable_point", "run_sweep", "sweep_experiment",
]
