"""Running a sweep: gather what is known, plan every point, carry the plan out.

`run_sweep` reads each point's config and the sweep's runs on the server, finds unfinished
checkpoints, and hands them to the pure planner (`tinytale.sweep.plan`: skip, resume or run
afresh, with which command), then to the executor (`tinytale.sweep.executor`: `parallel` at
a time, signals, failure records, the parent run). How a point process is started and read
back is `tinytale.sweep.protocol`; the file format is `tinytale.sweep.spec`; containers are
`tinytale.sweep.containers`; what a sweep reports is `tinytale.sweep.results`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tinytale.checkpoint import find_resumable, peek_checkpoint
from tinytale.config import Config, ConfigError, load_config
from tinytale.errors import UserError
from tinytale.sweep.containers import ContainerPoints, prepare_containers
from tinytale.sweep.executor import Books, execute
from tinytale.sweep.plan import (
    PointFacts,
    Resumable,
    Target,
    checkpoint_folders,
    decide,
    plan_sweep,
)
from tinytale.sweep.results import (
    MAX_EXIT_FAILED,
    PointResult,
    SweepResult,
    links,
    read_back_commands,
    render_results,
)
from tinytale.sweep.spec import SweepPoint, SweepSpec, resolved_overrides

__all__ = [
    "MAX_EXIT_FAILED", "PointResult", "SweepResult", "links", "point_config_hash",
    "point_facts", "read_back_commands", "render_results", "resumable_point", "run_sweep",
    "sweep_experiment",
]


def run_sweep(
    spec: SweepSpec,
    tracking_uri: str | None = None,
    out: Path = Path("runs"),
    parallel: int = 1,
    rerun: bool = False,
    experiment: str | None = None,
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    extra_args: Sequence[str] = (),
    launch: str | None = None,
) -> SweepResult:
    """Run every point not yet finished, `parallel` at a time, each in its own process.

    `launch` (a device: cpu, cuda or auto) runs each point in a trainer container of the
    compose stack instead, logging to the stack's server.
    """
    from tinytale.mlflow_tracker import reader as mr

    if parallel < 1:
        raise UserError(f"--parallel {parallel} must be at least 1.")
    containers, uri = _points_and_server(spec, launch, tracking_uri)
    exp_name = sweep_experiment(spec, experiment)
    facts = [point_facts(spec, point, exp_name) for point in spec.points]
    before = mr.sweep_point_runs(uri, exp_name, spec.name)
    parent_id = mr.start_sweep_parent(uri, exp_name, spec.name, _parent_params(spec), spec.text)
    exp_id = mr.ensure_experiment(uri, exp_name)
    for line in links(uri, exp_id, spec.name, parent_id):
        echo(line)
    target = Target(spec, exp_name, parent_id, uri, out, parallel, rerun, tuple(extra_args),
                    containers, dict(os.environ), os.cpu_count())
    target.log_dir.mkdir(parents=True, exist_ok=True)
    decisions = decide(facts, before, rerun)
    for decision in decisions:
        if decision.message:
            echo(decision.message)
    checkpoints = {i: Resumable(*resumable_point(folder, facts[i].config_hash))
                   for i, folder in checkpoint_folders(target, facts, decisions).items()}
    plan = plan_sweep(target, facts, before, decisions, checkpoints)
    books = Books(uri, exp_name, spec.name, parent_id, frozenset(r.run_id for r in before),
                  len(spec.points))
    points, stopped = execute(plan, books, parallel, echo)
    return SweepResult(spec.name, exp_name, parent_id, points, stopped, uri, exp_id)


def _points_and_server(spec: SweepSpec, launch: str | None, tracking_uri: str | None
                       ) -> tuple[ContainerPoints | None, str]:
    """Where points run (None: local processes) and the server the host keeps the books on."""
    from tinytale.mlflow_tracker import reader as mr

    if launch is None:
        return None, mr.tracking_uri_or_default(tracking_uri)
    containers = prepare_containers(spec.base, launch, tracking_uri)
    return containers, containers.tracking_uri


def _parent_params(spec: SweepSpec) -> dict[str, Any]:
    return {"sweep.base": str(spec.base), "sweep.points": len(spec.points),
            "sweep.grid_keys": ",".join(dict.fromkeys(k for p in spec.points
                                                      for k in p.overrides))}


def point_facts(spec: SweepSpec, point: SweepPoint, experiment: str) -> PointFacts:
    """What the planner needs to know about a point's config."""
    try:
        load_config(spec.base, spec.set_args(point))
        error = None
    except ConfigError as exc:  # the point fails without starting a process
        error = str(exc)
    return PointFacts(point, resolved_overrides(spec, point),
                      point_config_hash(spec, point, experiment), error)


def point_config_hash(spec: SweepSpec, point: SweepPoint, experiment: str) -> str | None:
    """The `config_hash` tag the point's run gets (None when its config is invalid)."""
    try:
        return load_config(spec.base, [*spec.set_args(point), f"tracking.experiment={experiment}",
                                       f"tracking.run_name={point.run_name}"]).hash()
    except ConfigError:
        return None


def resumable_point(point_dir: Path, config_hash: str | None
                    ) -> tuple[Path | None, str | None, str | None]:
    """(checkpoint, its run id, None) to resume a point stopped earlier (signal, crash).

    (None, None, None) when there is none; (None, None, why) when there is one but it was
    trained with another config, so the point must start afresh.
    """
    path = find_resumable(point_dir)
    if path is None:
        return None, None, None
    state = peek_checkpoint(path)
    try:
        same = Config.from_checkpoint(state.get("config")).hash() == config_hash
    except ConfigError:
        same = False
    if not same:
        return None, None, f"not resuming {path}: it was trained with another config"
    return path, state.get("run_id"), None


def sweep_experiment(spec: SweepSpec, override: str | None = None) -> str:
    return override or spec.experiment or load_config(spec.base).tracking.experiment
