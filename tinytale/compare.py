"""Overfitting analysis across runs: best epoch, overfitting onset, final gap, table and JSON.

Everything here is pure (the figure is drawn in compare_plot.py): it works on `RunCurves`
(plain data fetched elsewhere, see `tinytale.mlflow_tracker.reader`) and never talks to
MLflow, so every rule can be tested on hand-made curves.

Definitions (all "lower is better" metrics: losses and perplexities):

* best epoch: the epoch with the lowest value of the selected metric (the first one on ties;
  NaN/inf values are ignored).
* overfitting onset: the epoch where the metric bottoms out for good (the last epoch at its
  lowest value), reported only once the metric afterwards stayed clearly above that lowest
  value (by more than `ONSET_MARGIN`, 2% of it) for `patience` logged epochs in a row; `None`
  while the run is still improving, has flattened out, or has only wobbled. So the onset is
  never before the best epoch: noisy upticks on the way down are not memorisation.
* final gap: validation loss minus training loss at the last epoch that has both.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tinytale.metrics import perplexity
from tinytale.reference import LEVEL_NAMES, first_epoch_below, param_name

DEFAULT_METRIC = "val_loss"
DEFAULT_PATIENCE = 3
# How far above its lowest value the metric must stay to count as having risen: enough that a
# flat bottom with small wobbles is not called a rise, far below what a memorising run climbs
# (20% to 130% above its best in the shipped overfitting sweeps).
ONSET_MARGIN = 0.02

# The exact keys of one `--json` row, in column order; extra keys follow them.
JSON_KEYS = (
    "run_id", "run_name", "best_epoch", "best_val_loss", "best_val_perplexity",
    "final_gap", "overfit_onset", "tokens_per_sec",
)

# Config keys that are run bookkeeping, never "the difference between two runs".
_IGNORED_PARAM_PREFIXES = ("tracking.",)
_IGNORED_PARAMS = {"train.device", "train.compile", "train.num_threads",
                   "train.checkpoint_every_steps", "train.eval_batch_size"}

Series = list[tuple[int, float]]  # (epoch, value), sorted by epoch, one value per epoch


@dataclass
class RunCurves:
    """One run as compare needs it: identity, its config differences and metric histories."""

    run_id: str
    run_name: str
    status: str = "FINISHED"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] | None = None  # a sweep point's overrides (from its tag)
    histories: dict[str, Series] = field(default_factory=dict)  # metric -> series
    latest: dict[str, float] = field(default_factory=dict)  # metric -> last logged value


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    best_epoch: int | None
    best_val_loss: float | None
    best_val_perplexity: float | None
    final_gap: float | None
    overfit_onset: int | None
    tokens_per_sec: float | None
    overrides: dict[str, Any]
    status: str
    metric: str
    best_metric_value: float | None
    # The run's reference levels (uniform, unigram, bigram loss), and the first epochs its
    # validation loss fell below the unigram and bigram ones.
    reference_losses: dict[str, float] = field(default_factory=dict)
    beat_unigram_epoch: int | None = None
    beat_bigram_epoch: int | None = None

    def to_json(self) -> dict[str, Any]:
        row = {key: getattr(self, key) for key in JSON_KEYS}
        row.update(overrides=self.overrides, status=self.status, metric=self.metric,
                   best_metric_value=self.best_metric_value,
                   beat_unigram_epoch=self.beat_unigram_epoch,
                   beat_bigram_epoch=self.beat_bigram_epoch,
                   reference_losses=self.reference_losses)
        return {key: _json_safe(value) for key, value in row.items()}


# --------------------------------------------------------------------------- pure curve rules


def clean_series(points: Iterable[tuple[int, float]]) -> Series:
    """Sort by epoch, keep the last value logged for an epoch (a resumed run may repeat one)."""
    by_epoch: dict[int, float] = {}
    for epoch, value in points:
        by_epoch[int(epoch)] = float(value)
    return sorted(by_epoch.items())


def best_epoch(series: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """`(epoch, value)` of the lowest finite value (the earliest on ties); None if there is none."""
    best: tuple[int, float] | None = None
    for epoch, value in series:
        if math.isfinite(value) and (best is None or value < best[1]):
            best = (epoch, value)
    return best


def overfit_onset(series: Sequence[tuple[int, float]], patience: int = DEFAULT_PATIENCE,
                  margin: float = ONSET_MARGIN) -> int | None:
    """The epoch after which the metric never got back to its best, once it clearly rose; else None.

    That epoch is the last one at the lowest finite value: on a flat bottom the climb starts
    after its last epoch, and a curve that comes back down to its low has not overfitted yet.
    It is reported once, somewhere after it, `patience` consecutive logged epochs all lie
    more than `margin` (relative) above that low; a NaN/inf breaks such a run of epochs.
    Taking the onset from the minimum, not from the first few rising epochs, keeps it from
    landing on a noisy uptick while the curve is still falling overall.
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    finite = [(epoch, value) for epoch, value in series if math.isfinite(value)]
    if not finite:
        return None
    low = min(value for _, value in finite)
    bottom = max(i for i, (_, value) in enumerate(series) if value == low)
    # abs(): the threshold must lie above `low` for a metric that can go negative too.
    threshold = low + margin * abs(low)
    above = 0
    for _, value in series[bottom + 1:]:
        above = above + 1 if math.isfinite(value) and value > threshold else 0
        if above >= patience:
            return series[bottom][0]
    return None


def final_gap(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]]
              ) -> float | None:
    """Validation minus training value at the last epoch that has both (finite); else None."""
    train_at = {epoch: value for epoch, value in train if math.isfinite(value)}
    for epoch, value in reversed(val):
        if epoch in train_at and math.isfinite(value):
            return value - train_at[epoch]
    return None


def train_metric_for(metric: str) -> str | None:
    """The training counterpart drawn dashed next to `metric`: val_loss -> train_loss."""
    if metric.startswith("val_"):
        return "train_" + metric[len("val_"):]
    return None


def metrics_needed(metric: str) -> list[str]:
    """Histories compare has to fetch for `metric` (tokens/s comes from the latest value)."""
    keys = [metric, "val_loss", "train_loss"]
    train = train_metric_for(metric)
    if train:
        keys.append(train)
    return list(dict.fromkeys(keys))


def differing_params(runs: Sequence[RunCurves]) -> dict[str, dict[str, Any]]:
    """Per run, the config params whose value is not the same in every compared run."""
    keys = set().union(*(r.params for r in runs)) if runs else set()
    keys = {k for k in keys if "." in k and not k.startswith(_IGNORED_PARAM_PREFIXES)
            and k not in _IGNORED_PARAMS and k.split(".")[0] in ("model", "data", "train")}
    varying = sorted(k for k in keys if len({r.params.get(k) for r in runs}) > 1)
    return {r.run_id: {k: _parse_param(r.params.get(k)) for k in varying} for r in runs}


def _parse_param(text: str | None) -> Any:
    if text is None:
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def summarize(run: RunCurves, metric: str = DEFAULT_METRIC, patience: int = DEFAULT_PATIENCE,
              overrides: dict[str, Any] | None = None) -> RunSummary:
    """The table row of one run; `overrides` stands in when the run has no sweep tag."""
    series = run.histories.get(metric, [])
    best = best_epoch(series)
    val = run.histories.get("val_loss", [])
    val_at = dict(val)
    best_val_loss = None
    if best is not None:
        best_val_loss = best[1] if metric == "val_loss" else val_at.get(best[0])
    levels = reference_losses(run)
    tps_series = [v for _, v in run.histories.get("tokens_per_sec", []) if math.isfinite(v)]
    tokens_per_sec = (statistics.median(tps_series) if tps_series
                      else run.latest.get("tokens_per_sec"))
    return RunSummary(
        run_id=run.run_id,
        run_name=run.run_name,
        best_epoch=best[0] if best else None,
        best_val_loss=best_val_loss,
        best_val_perplexity=(perplexity(best_val_loss) if best_val_loss is not None
                             and math.isfinite(best_val_loss) else None),
        final_gap=final_gap(run.histories.get("train_loss", []), val),
        overfit_onset=overfit_onset(series, patience),
        tokens_per_sec=tokens_per_sec,
        overrides=run.overrides if run.overrides is not None else (overrides or {}),
        status=run.status,
        metric=metric,
        best_metric_value=best[1] if best else None,
        reference_losses=levels,
        beat_unigram_epoch=first_epoch_below(val, levels.get("unigram")),
        beat_bigram_epoch=first_epoch_below(val, levels.get("bigram")),
    )


def reference_losses(run: RunCurves) -> dict[str, float]:
    """The reference levels the run logged as params (tinytale.reference); {} for older runs."""
    levels = {name: _parse_param(run.params.get(param_name(name))) for name in LEVEL_NAMES}
    return {name: float(v) for name, v in levels.items()
            if isinstance(v, int | float) and math.isfinite(v)}


def summarize_all(runs: Sequence[RunCurves], metric: str = DEFAULT_METRIC,
                  patience: int = DEFAULT_PATIENCE) -> list[RunSummary]:
    """Rows for every run; runs without a sweep tag show the params that differ between runs."""
    differ = differing_params(runs)
    return [summarize(r, metric, patience, differ.get(r.run_id)) for r in runs]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- table and JSON


def format_overrides(overrides: Mapping[str, Any]) -> str:
    """`{'model.dropout': 0.2, 'train.weight_decay': 0.1}` -> `dropout=0.2,weight_decay=0.1`.

    Keys are shortened to their last part unless two keys would then read the same.
    """
    if not overrides:
        return ""
    short = [key.split(".")[-1] for key in overrides]
    use_short = len(set(short)) == len(short)
    parts = []
    for key, name in zip(overrides, short, strict=True):
        parts.append(f"{name if use_short else key}={_fmt_value(overrides[key])}")
    return ",".join(parts)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_json(rows: Sequence[RunSummary]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2, allow_nan=False)


TABLE_COLUMNS = ("run", "overrides", "best_epoch", "best_val_loss", "best_val_ppl",
                 "final_gap", "onset", "tokens/s")


def render_table(rows: Sequence[RunSummary]) -> str:
    """An aligned text table, one line per run (numbers right-aligned)."""
    from tinytale.table import format_table

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    body = []
    for r in rows:
        name = r.run_name if r.status == "FINISHED" else f"{r.run_name} ({r.status.lower()})"
        body.append((
            name,
            format_overrides(r.overrides) or "-",
            "-" if r.best_epoch is None else str(r.best_epoch),
            num(r.best_val_loss, ".4f"),
            num(r.best_val_perplexity, ".3f"),
            num(r.final_gap, "+.4f"),
            "none" if r.overfit_onset is None else str(r.overfit_onset),
            num(r.tokens_per_sec, ",.0f"),
        ))
    return format_table(TABLE_COLUMNS, body, right=range(2, len(TABLE_COLUMNS)))


_FIGURE = ("check_figure_path", "plot_curves", "prefetch_plotting")


def __getattr__(name: str) -> Any:
    """The figure's entry points (drawn in compare_plot.py, which imports this module) as
    `compare.plot_curves` etc., looked up on first use so neither import needs the other's
    end."""
    if name in _FIGURE:
        from tinytale import compare_plot

        return getattr(compare_plot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
