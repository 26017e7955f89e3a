"""The figure of `tinytale compare`: train (dashed) and validation (solid) curves per run,
best epochs, overfitting onsets and the runs' reference levels, drawn with matplotlib's Agg
canvas (no display). The numbers come from tinytale.compare, which stays pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinytale.compare import (
    DEFAULT_METRIC,
    RunCurves,
    RunSummary,
    format_overrides,
    train_metric_for,
)
from tinytale.errors import UserError
from tinytale.paths import check_can_make_folder


def prefetch_plotting() -> None:
    """Import matplotlib on a background thread while the caller waits on the network."""
    import threading

    def load() -> None:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

    threading.Thread(target=load, name="prefetch-matplotlib", daemon=True).start()


def run_label(summary: RunSummary) -> str:
    overrides = format_overrides(summary.overrides)
    if overrides and overrides != summary.run_name:
        return f"{summary.run_name} [{overrides}]"
    return summary.run_name


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def check_figure_path(out: Path) -> None:
    """Refuse a figure path whose folder cannot be made or written, before anything is fetched."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; pass a file name such as "
                        f"'{out / 'curves.png'}'.")
    fix = "pass a path in a folder you can write to"
    check_can_make_folder(out.parent, f"--out '{out}'", if_file=fix, if_read_only=fix)


def _draw_reference_levels(ax: Any, summaries: Sequence[RunSummary]) -> None:
    """Each distinct reference level of the compared runs as a grey horizontal line, labelled
    at its left end (runs on the same data share one line per level)."""
    styles = {"uniform": ":", "unigram": "-.", "bigram": (0, (6, 3))}
    drawn: set[tuple[str, float]] = set()
    for summary in summaries:
        for name, level in summary.reference_losses.items():
            if (name, round(level, 3)) in drawn:
                continue
            drawn.add((name, round(level, 3)))
            ax.axhline(level, color="0.45", linewidth=1.0, linestyle=styles.get(name, "--"),
                       zorder=1)
            ax.annotate(f"{name} level {level:.3f}", (0.005, level),
                        xycoords=("axes fraction", "data"), xytext=(2, 3),
                        textcoords="offset points", fontsize=8, color="0.3")


def plot_curves(runs: Sequence[RunCurves], summaries: Sequence[RunSummary], out: Path,
                metric: str = DEFAULT_METRIC, title: str | None = None) -> Path:
    """Train (dashed) and validation (solid) curves per run on shared axes, best epoch marked.

    The format follows `out`'s suffix (.png, .svg, .pdf); uses the Agg canvas, no display.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    train_key = train_metric_for(metric)
    n = len(runs)
    legend_outside = n > 6
    fig = Figure(figsize=(13 if legend_outside else 10, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: cheaper than constrained layout; room on the right for a long legend.
    fig.subplots_adjust(left=0.07, bottom=0.1, top=0.92,
                        right=(0.7 if n > 25 else 0.74) if legend_outside else 0.97)
    ax = fig.add_subplot()
    colours = _colours(n)
    run_handles = []
    many = n > 12
    for i, (run, summary, colour) in enumerate(zip(runs, summaries, colours, strict=True)):
        # With few runs, each later line is a little thinner, so identical curves still show
        # every colour (the earlier, wider line peeks out around the later one).
        width = 1.2 if many else max(1.2, 3.0 - 0.35 * i) if n <= 6 else 1.8
        val = run.histories.get(metric, [])
        if val:
            xs, ys = zip(*val, strict=True)
            ax.plot(xs, ys, color=colour, linewidth=width, linestyle="-")
        train = run.histories.get(train_key, []) if train_key else []
        if train:
            xs, ys = zip(*train, strict=True)
            ax.plot(xs, ys, color=colour, linewidth=0.8 * width, linestyle="--", alpha=0.85)
        if summary.best_epoch is not None and summary.best_metric_value is not None:
            ax.plot([summary.best_epoch], [summary.best_metric_value], marker="o",
                    markersize=5 if many else 8, color=colour, markeredgecolor="black",
                    markeredgewidth=0.8, linestyle="none", zorder=5)
        if summary.overfit_onset is not None and not many:
            ax.axvline(summary.overfit_onset, color=colour, linewidth=0.8, linestyle=":",
                       alpha=0.7)
        run_handles.append(Line2D([], [], color=colour, linewidth=2.5, label=run_label(summary)))

    if metric.endswith("_loss"):
        _draw_reference_levels(ax, summaries)
    pretty = metric.removeprefix("val_").replace("_", " ")
    ax.set_xlabel("epoch", fontsize=12)
    ax.set_ylabel(f"{pretty} (train dashed, validation solid)", fontsize=12)
    ax.set_title(title or f"Train vs validation {pretty} per epoch ({n} run{'s' * (n != 1)})",
                 fontsize=14)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    style_handles = [
        Line2D([], [], color="dimgray", linestyle="--", label=f"train {pretty}"),
        Line2D([], [], color="dimgray", linestyle="-", label=f"validation {pretty}"),
        Line2D([], [], color="dimgray", marker="o", markeredgecolor="black", linestyle="none",
               label="best validation epoch"),
    ]
    if not many:  # onset lines are drawn for a dozen runs at most
        style_handles.append(Line2D([], [], color="dimgray", linestyle=":",
                                    label="overfitting onset"))
    runs_font = 7 if many else 9
    if legend_outside:
        first = ax.legend(handles=run_handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                          fontsize=runs_font, title="runs", ncol=2 if n > 25 else 1,
                          frameon=False)
        ax.add_artist(first)
        ax.legend(handles=style_handles, loc="upper right", fontsize=9)
    else:
        first = ax.legend(handles=run_handles, loc="upper right", fontsize=runs_font,
                          title="runs")
        ax.add_artist(first)
        ax.legend(handles=style_handles, loc="upper center", fontsize=9)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # SVG keeps its labels as text (searchable, selectable, crisp at any zoom) rather than
        # matplotlib's default of glyph outlines.
        with rc_context({"svg.fonttype": "none"}):
            fig.savefig(out)
    except OSError as exc:
        raise UserError(f"cannot write the figure '{out}' ({exc.strerror or exc}); pass --out "
                        "in a folder you can write to.") from None
    return out
