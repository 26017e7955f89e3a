"""The tracker interface the training loop reports to, and the trackers that need no server.

The loop calls only these methods; which backend listens (console, MLflow, several at
once) is decided by whoever builds the tracker. What the loop calls while it trains
(`log_metrics`, `on_progress`, `on_event`, `log_text`) must be cheap: anything slow (network)
belongs on a background thread inside the tracker. The two calls after the loop may block:
`publish_model` may send the model and wait for its registration, and `finish` waits (for a
bounded time) until what is left has been sent.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO


@dataclass
class RunInfo:
    """What a tracker needs to open (or reopen) a run; built by the CLI, not by the loop."""

    experiment: str
    run_name: str
    params: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    config_yaml: str = ""
    resume_run_id: str | None = None
    parent_run_id: str | None = None
    local_dir: Path | None = None  # the run's checkpoint folder (for spools, local copies)
    # What the run trains and validates on (tinytale.datasets.corpus_datasets), logged once.
    datasets: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Registration:
    """What publishing the best checkpoint did: a registered model version, or a pending one.

    `version` is None while the record waits in `pending_spool` for an unreachable server, and
    when registering is off (`model` None too).
    """

    model: str | None = None
    version: str | None = None
    model_uri: str | None = None
    model_id: str | None = None
    champion: bool | None = None
    pending_spool: str | None = None
    seconds: float | None = None  # how long logging and registering took

    @classmethod
    def from_record(cls, rec: dict[str, Any], seconds: float | None = None) -> Registration:
        """From the spool's `registered` record (the replayer's account of what it did)."""
        return cls(model=rec.get("registered_model"), version=rec.get("registered_version"),
                   model_uri=rec.get("model_uri"), model_id=rec.get("model_id"),
                   champion=rec.get("champion"), seconds=seconds)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"registered_model": self.model,
                               "registered_version": self.version}
        for key, value in (("model_uri", self.model_uri), ("model_id", self.model_id),
                           ("champion", self.champion),
                           ("registration_time_s", self.seconds)):
            if value is not None:
                out[key] = value
        if self.pending_spool is not None:
            out.update(registration="pending", spool=self.pending_spool)
        return out


@dataclass
class Closed:
    """What a tracker knows once the run is closed (all of it may have arrived late)."""

    run_id: str | None = None
    run_url: str | None = None  # the run's page in the MLflow UI (servers only)
    tracking_uri: str | None = None
    registration: Registration | None = None


@dataclass
class RunSummary:
    """One finished, stopped or failed run: what `tinytale train --json` prints as its last
    line and what `tinytale sweep` reads back from each point (`to_json` / `from_json`)."""

    status: str
    run_id: str | None = None
    epochs: int = 0
    best_epoch: int | None = None
    best_val_loss: float | None = None
    first_step_loss: float | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    tokens_per_sec: float | None = None
    train_time_s: float = 0.0
    early_stopped: bool = False
    checkpoint: str | None = None
    reason: str | None = None
    vocab_size: int | None = None
    run_dir: str | None = None
    diverged: bool = False
    tracking_uri: str | None = None
    run_url: str | None = None
    # The first epoch whose validation loss was below the unigram / bigram reference level.
    beat_unigram_epoch: int | None = None
    beat_bigram_epoch: int | None = None
    reference_losses: dict[str, float] = field(default_factory=dict)  # level -> nats/token
    sampling_s: float = 0.0  # time spent generating the per-epoch samples
    # What tracking cost the loop (TrackingCosts keys); empty when untracked.
    costs: dict[str, float] = field(default_factory=dict)
    registration: Registration | None = None

    def to_json(self) -> dict[str, Any]:
        """A flat JSON object: the fields, the costs and the registration's keys at top level."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("costs", "registration")}
        if self.tracking_uri is None:
            del out["tracking_uri"]
        if self.run_url is None:
            del out["run_url"]
        out.update(self.costs)
        if self.registration is not None:
            out.update(self.registration.to_json())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        names = {f.name for f in fields(cls)} - {"costs", "registration"}
        known = {k: v for k, v in data.items() if k in names}
        costs = {k: float(v) for k, v in data.items() if k in COST_KEYS}
        registration = None
        if "registered_model" in data or data.get("registration") == "pending":
            registration = Registration(
                model=data.get("registered_model"), version=data.get("registered_version"),
                model_uri=data.get("model_uri"), model_id=data.get("model_id"),
                champion=data.get("champion"), seconds=data.get("registration_time_s"),
                pending_spool=data.get("spool") if data.get("registration") == "pending"
                else None)
        return cls(**{"status": "FAILED", **known}, costs=costs, registration=registration)


COST_KEYS = ("tracking_loop_s", "tracking_threads_cpu_s")


class Tracker:
    """Base class: every hook is a no-op, so a tracker implements only what it cares about.

    The contract with the loop is narrow: `log_metrics` is the sink it reports to (plus
    `on_progress`, `on_event`); whoever runs the loop opens the run with `start`, publishes the
    best checkpoint with `publish_model` and closes with `finish`.
    """

    run_id: str | None = None
    # Whether what it is given (log_text, artifacts) is kept anywhere: work whose only reader
    # would be this tracker (generating samples) is skipped when not.
    keeps_records: bool = False

    def check(self, info: RunInfo) -> None:
        """Before anything of the run is printed or written: raise UserError when the backend
        refuses the run (a server refusing our login). `start` checks too; nothing by default."""

    def start(self, info: RunInfo) -> str | None:
        """Open the run; return its id (None when the backend has no ids)."""
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics with step = epoch, or step-level ones with step = optimizer step."""

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        """Called after every micro-batch; must cost next to nothing."""

    def on_event(self, name: str, detail: dict[str, Any]) -> None:
        """Something worth recording: early stop, skipped non-finite step, resume."""

    def log_text(self, name: str, text: str) -> None:
        """A small text artifact (generated samples, a report)."""

    def log_samples(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        """Text generated at the end of `epoch`: one row per sample (`epoch`, `val_loss`,
        `sample`, `text`, `prompt`, `temperature`, `seed`)."""

    def publish_model(self, model_file: Path, summary: RunSummary,
                      example_prompt: str = "") -> Registration | None:
        """Publish the run's model (e.g. register a model version); None: not published.
        `model_file` is the best checkpoint without its training state (checkpoint.MODEL),
        `example_prompt` a prompt its tokenizer encodes, shown as an example request."""
        return None

    def costs(self) -> dict[str, float]:
        """Seconds this tracker has cost the run so far (COST_KEYS); none by default."""
        return {}

    def finish(self, status: str) -> Closed:
        """Close the run: status is FINISHED, FAILED or KILLED. Flush everything first.

        Returns what is known once closed: the run id, its UI link, and a registration that
        completed only while closing (a server that came back while finish waited)."""
        return Closed()


class NullTracker(Tracker):
    pass


class FanoutTracker(Tracker):
    """Sends every call to several trackers; the first one with a run id names the run."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        # Read live: a tracker that started offline learns its run id later.
        return next((t.run_id for t in self.trackers if t.run_id), None)

    @property
    def keeps_records(self) -> bool:  # type: ignore[override]
        return any(t.keeps_records for t in self.trackers)

    def check(self, info: RunInfo) -> None:
        for t in self.trackers:
            t.check(info)

    def start(self, info: RunInfo) -> str | None:
        self.check(info)  # a refusal is then the only line: the console has not announced it
        ids = [t.start(info) for t in self.trackers]
        return next((i for i in ids if i), None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        for t in self.trackers:
            t.on_progress(epoch, batch, n_batches)

    def on_event(self, name: str, detail: dict[str, Any]) -> None:
        for t in self.trackers:
            t.on_event(name, detail)

    def log_text(self, name: str, text: str) -> None:
        for t in self.trackers:
            t.log_text(name, text)

    def log_samples(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        for t in self.trackers:
            t.log_samples(epoch, rows)

    def publish_model(self, model_file: Path, summary: RunSummary,
                      example_prompt: str = "") -> Registration | None:
        published = [t.publish_model(model_file, summary, example_prompt) for t in self.trackers]
        return next((r for r in published if r is not None), None)

    def costs(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for t in self.trackers:
            for k, v in t.costs().items():
                result[k] = result.get(k, 0.0) + v
        return result

    def finish(self, status: str) -> Closed:
        closed = Closed()
        for t in self.trackers:
            mine = t.finish(status)
            for f in fields(Closed):
                if getattr(closed, f.name) is None:
                    setattr(closed, f.name, getattr(mine, f.name))
        return closed


EPOCH_COLUMNS = (
    ("epoch", "epoch", "{:>5d}"),
    ("train_loss", "train", "{:>7.4f}"),
    ("val_loss", "val", "{:>7.4f}"),
    ("val_perplexity", "val_ppl", "{:>8.3f}"),  # see _cell: huge values in e-notation
    ("lr", "lr", "{:>9.2e}"),
    ("tokens_per_sec", "tok/s", "{:>8.0f}"),
    ("epoch_time_s", "time_s", "{:>6.2f}"),
)


def _cell(key: str, fmt: str, value: float) -> str:
    """One table cell; a value too large for the column's fixed-point form (a diverging
    run's perplexity) in e-notation of the same width, and inf as inf."""
    if key == "epoch":
        return fmt.format(int(value))
    text = fmt.format(value)
    width = len(fmt.format(0))
    if len(text) > width and math.isfinite(value):
        text = f"{value:>{width}.{max(0, width - 6)}e}"  # d.dde+XX fills width 8
    return text


class ConsoleTracker(Tracker):
    """A readable per-epoch table on stderr, with a progress bar within epochs on a terminal."""

    def __init__(self, stream: TextIO | None = None, progress: bool | None = None):
        self.stream = stream or sys.stderr
        self.progress = self.stream.isatty() if progress is None else progress
        self._header_done = False
        self._last_draw = 0.0

    def start(self, info: RunInfo) -> str | None:
        self._write(f"run '{info.run_name}' in experiment '{info.experiment}'")
        levels = {k.removeprefix("reference.").removesuffix("_loss"): v
                  for k, v in info.params.items() if k.startswith("reference.")}
        if levels:  # what validation loss to beat (tinytale/reference.py)
            self._write("reference val loss: " + ", ".join(f"{k} {float(v):.4f}"
                                                          for k, v in levels.items()))
        return None

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if not self.progress:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1 and batch < n_batches:
            return
        self._last_draw = now
        width = 30
        filled = int(width * batch / max(1, n_batches))
        self.stream.write(
            f"\repoch {epoch:>4d} [{'#' * filled}{'.' * (width - filled)}] {batch}/{n_batches}"
        )
        self.stream.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "val_loss" not in metrics:
            return  # step-level metrics: the progress bar is enough on a console
        if self.progress:
            self.stream.write("\r\033[K")
        if not self._header_done:
            self._write(" ".join(f"{title:>{len(fmt.format(0))}}" for _, title, fmt in
                                  EPOCH_COLUMNS))
            self._header_done = True
        row = {**metrics, "epoch": step}
        cells = []
        for key, _, fmt in EPOCH_COLUMNS:
            cells.append(_cell(key, fmt, row.get(key, math.nan)))
        self._write(" ".join(cells))

    def log_samples(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        if rows:  # one line: the first (greedy) sample, as much as fits a wide terminal
            text = rows[0]["text"].replace("\n", " ")
            self._write(f"sample @ epoch {epoch}: {text[:100]}{'...' * (len(text) > 100)}")

    def on_event(self, name: str, detail: dict[str, Any]) -> None:
        if "message" in detail:  # an event meant for a person: one warning line
            self._write(f"warning: {detail['message']}")
            return
        pretty = ", ".join(f"{k}={v}" for k, v in detail.items())
        self._write(f"[{name}] {pretty}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

