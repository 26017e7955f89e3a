"""`tinytale compare` from names to a figure: fetch the runs, summarise, draw, log the figure.

The rules are in `tinytale.compare` (pure, tested on hand-made curves); this is the part that
talks to MLflow, through `tinytale.mlflow_tracker.reader`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tinytale import compare as cmp
from tinytale.errors import UserError


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare_runs(
    tracking_uri: str | None,
    runs: Sequence[str] = (),
    *,
    experiment: str | None = None,
    sweep: str | None = None,
    metric: str = cmp.DEFAULT_METRIC,
    patience: int = cmp.DEFAULT_PATIENCE,
    out: Path = Path("curves.png"),
    svg: bool = False,
    limit: int = 100,
    log_figure: bool = True,
    say: Callable[[str], None] = _to_stderr,
) -> list[cmp.RunSummary]:
    """The table rows of the runs found (by id or name, the newest of `experiment`, or every
    point of `sweep`), after drawing them to `out` (and an SVG beside it with `svg`).

    A sweep's figure is also logged to the sweep's parent run unless `log_figure` is off;
    `say` gets the lines for stderr (figure paths, what was logged). Mistakes a user can fix
    raise `UserError` before anything is fetched where possible.
    """
    cmp.prefetch_plotting()  # overlaps matplotlib's import with MLflow's and the network
    from tinytale.mlflow_tracker import reader as mr

    if out.suffix.lower() not in (".png", ".svg"):
        raise UserError(f"--out '{out}' must end in .png or .svg.")
    cmp.check_figure_path(out)
    found = mr.find_runs(tracking_uri, list(runs), experiment, sweep, limit)
    mr.fetch_histories(tracking_uri, found, cmp.metrics_needed(metric))
    if not any(r.histories.get(metric) for r in found):
        raise UserError(f"none of the {len(found)} runs logged the metric '{metric}'; "
                        "use e.g. --metric val_loss.")
    rows = cmp.summarize_all(found, metric, patience)
    title = None
    if sweep:
        title = f"Sweep '{sweep}': train vs validation {metric.removeprefix('val_')}"
    figures = [cmp.plot_curves(found, rows, out, metric, title)]
    if svg and out.suffix.lower() != ".svg":
        figures.append(cmp.plot_curves(found, rows, out.with_suffix(".svg"), metric, title))
    for figure in figures:
        say(f"figure: {figure}")
    parents = [r.tags.get(mr.PARENT_TAG) for r in found if r.tags.get(mr.PARENT_TAG)]
    if sweep and parents and log_figure:
        parent = max(set(parents), key=parents.count)
        for figure in figures:
            path = mr.log_figure(tracking_uri, parent, figure)
            say(f"logged {path} to sweep parent run {parent}")
    return rows
