"""What a sweep reports: each point's outcome, the exit code, the table and the links.

`render_results` is the table `tinytale sweep` prints; `links` and `read_back_commands` are
the MLflow UI pages and host commands that show the sweep's results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MAX_EXIT_FAILED = 125  # exit codes 126-255 mean "cannot execute" and signals to shells


@dataclass
class PointResult:
    index: int
    run_name: str
    overrides: dict[str, Any]
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (finished before) | NOT_STARTED
    run_id: str | None = None
    best_epoch: int | None = None
    best_val_loss: float | None = None
    seconds: float = 0.0
    log: str | None = None
    error: str | None = None
    diverged: bool = False  # finished far above the guessing loss (see train.diverged)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SweepResult:
    name: str
    experiment: str
    parent_run_id: str
    points: list[PointResult]
    interrupted: str | None = None  # the signal name when the sweep was stopped
    tracking_uri: str = ""  # where the host reads the results (the stack's server for --launch)
    experiment_id: str | None = None

    @property
    def failed(self) -> int:
        return sum(p.status in ("FAILED", "KILLED") for p in self.points)

    @property
    def exit_code(self) -> int:
        """Failed points (capped at 125), or 130/143 when the sweep itself was stopped."""
        if self.interrupted:
            return {"SIGINT": 130, "SIGTERM": 143}.get(self.interrupted, 1)
        return min(self.failed, MAX_EXIT_FAILED)

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.name, "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "finished": sum(p.status == "FINISHED" for p in self.points),
            "skipped": sum(p.status == "SKIPPED" for p in self.points),
            "failed": self.failed,
            "points": [p.to_json() for p in self.points],
        }


def links(uri: str, experiment_id: str | None, sweep: str, parent_run_id: str) -> list[str]:
    """The sweep's pages in the MLflow UI, when the store is a server (none for local files)."""
    from tinytale.mlflow_tracker.uris import run_url, sweep_charts_url

    parent = run_url(uri, experiment_id, parent_run_id)
    charts = sweep_charts_url(uri, experiment_id, sweep)
    return ([f"sweep parent run: {parent}"] if parent else []) + \
        ([f"every point's curves: {charts}"] if charts else [])


def read_back_commands(result: SweepResult) -> list[str]:
    """The host commands that read this sweep's results, with the store they are in."""
    from tinytale.mlflow_tracker.uris import default_tracking_uri

    uri = result.tracking_uri
    flag = "" if not uri or uri == default_tracking_uri() else f" --tracking-uri {uri}"
    lines = [f"  tinytale compare --sweep {result.name}{flag} --out {result.name}.png",
             f"  tinytale runs --experiment {result.experiment}{flag}"]
    if not flag:
        lines.append(f"  mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000")
    return ["read the results:", *lines,
            *links(uri, result.experiment_id, result.name, result.parent_run_id)]


def render_results(result: SweepResult) -> str:
    """The table `tinytale sweep` prints: one row per point, a summary line, how to read it."""
    from tinytale.table import format_table

    columns = ("#", "run", "status", "best_epoch", "best_val_loss", "seconds", "run_id")
    rows = [(str(p.index), p.run_name,
             f"{p.status} (diverged)" if p.diverged else p.status,
             "-" if p.best_epoch is None else str(p.best_epoch),
             "-" if p.best_val_loss is None else f"{p.best_val_loss:.4f}",
             f"{p.seconds:.1f}" if p.seconds else "-", p.run_id or "-")
            for p in result.points]
    lines = [format_table(columns, rows)]
    stopped = f", stopped by {result.interrupted}" if result.interrupted else ""
    lines.append(f"sweep '{result.name}' in experiment '{result.experiment}', parent run "
                 f"{result.parent_run_id}: {result.failed} failed{stopped}")
    return "\n".join(lines + read_back_commands(result))
