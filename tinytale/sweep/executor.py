"""Carrying out a sweep plan: points `parallel` at a time, signals passed on, outcomes recorded.

Each point that runs is one child (a local process or a trainer container, see
`tinytale.sweep.protocol`). SIGINT/SIGTERM to the sweep become SIGTERM to every running
child, which saves a checkpoint and exits; points not started yet are not started. A point
that failed or was stopped gets a FAILED (or KILLED) child run under the parent, and the
parent run is closed with the sweep's counts whatever happens.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tinytale.signals import on_stop_signals
from tinytale.sweep import protocol
from tinytale.sweep.plan import PlannedPoint
from tinytale.sweep.results import PointResult
from tinytale.sweep.spec import overrides_key

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Books:
    """Where outcomes are recorded: the sweep's parent run, and what was there before."""

    tracking_uri: str
    experiment: str
    sweep: str
    parent_run_id: str
    known_run_ids: frozenset[str]  # the sweep's point runs before this sweep started
    total: int  # points in the sweep


class _Processes:
    """The running point processes, so a signal can stop them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped: str | None = None

    @contextmanager
    def watch(self, proc: subprocess.Popen) -> Iterator[None]:
        with self.lock:
            self.running.add(proc)
        try:
            yield
        finally:
            with self.lock:
                self.running.discard(proc)

    def stop(self, reason: str) -> None:
        with self.lock:
            self.stopped = self.stopped or reason
            for proc in self.running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # each child checkpoints and exits


def execute(plan: Sequence[PlannedPoint], books: Books, parallel: int, echo: Echo
            ) -> tuple[list[PointResult], str | None]:
    """Every point's result in the plan's order, and the signal that stopped the sweep."""
    procs = _Processes()
    results = {p.index: _skipped(p) for p in plan if p.action == "skip"}
    to_run = [p for p in plan if p.action != "skip"]

    def on_stop(name: str) -> None:
        echo(f"{name} received: stopping the running points (they save a checkpoint)")
        procs.stop(name)

    try:
        with on_stop_signals(on_stop), ThreadPoolExecutor(max_workers=parallel) as pool:
            outcomes = pool.map(lambda p: _run_point(p, books, procs, echo), to_run)
            for point, result in zip(to_run, outcomes, strict=True):
                results[point.index] = result
    finally:
        done = [results[i] for i in sorted(results)]
        _finish_parent(books, done, procs.stopped)
    return done, procs.stopped


def _run_point(point: PlannedPoint, books: Books, procs: _Processes, echo: Echo
               ) -> PointResult:
    label = f"[{point.index + 1}/{books.total}] {point.run_name}"
    if procs.stopped:
        return PointResult(point.index + 1, point.run_name, point.overrides, "NOT_STARTED",
                           error=f"sweep stopped by {procs.stopped}")
    if point.action == "invalid":
        return _record_invalid(point, books, label, echo)
    if point.note:
        echo(f"{label}: {point.note}")
    echo(f"{label}: " + (f"resuming run {point.resume_run_id} from {point.resume_from}"
                         if point.resume_from else "started")
         + f"{point.where} (log: {point.log})")
    start = time.monotonic()
    outcome = protocol.run_child(point.command, point.env, point.log, procs.watch)
    seconds = round(time.monotonic() - start, 2)
    result = PointResult(point.index + 1, point.run_name, point.overrides, outcome.status,
                         outcome.run_id, outcome.best_epoch, outcome.best_val_loss, seconds,
                         str(point.log), diverged=outcome.diverged)
    if outcome.status != "FINISHED":
        result.error = (f"stopped by {procs.stopped or 'a signal'}; its checkpoint is in "
                        f"{point.checkpoints}" if outcome.status == "KILLED" else outcome.error)
        result.run_id = _record_failure(books, point, result.error, result.status)
    best = (f", best val_loss {result.best_val_loss:.4f} at epoch {result.best_epoch}"
            if result.best_val_loss is not None else "")
    echo(f"{label}: {result.status} in {seconds:.1f}s{best}"
         + (f" ({result.error})" if result.error else ""))
    return result


def _skipped(point: PlannedPoint) -> PointResult:
    from tinytale.mlflow_tracker.reader import summary_number

    assert point.finished is not None
    return PointResult(point.index + 1, point.run_name, point.overrides, "SKIPPED",
                       point.finished.run_id, best_val_loss=summary_number(
                           point.finished.tags, point.finished.latest, "best_val_loss"))


def _record_invalid(point: PlannedPoint, books: Books, label: str, echo: Echo) -> PointResult:
    """A point whose config is invalid fails without starting a process."""
    from tinytale.mlflow_tracker import reader as mr

    error = point.config_error or ""
    result = PointResult(point.index + 1, point.run_name, point.overrides, "FAILED",
                         error=error)
    result.run_id = mr.record_failed_point(books.tracking_uri, books.experiment,
                                           books.parent_run_id, point.run_name, point.tags,
                                           error)
    echo(f"{label}: FAILED ({error})")
    return result


def _record_failure(books: Books, point: PlannedPoint, error: str, status: str) -> str | None:
    """Make sure the failed point has a FAILED (or KILLED) child run, and return its id."""
    from tinytale.mlflow_tracker import reader as mr

    # Runs of this attempt: new ones, or the one it resumed. Newest first: a run this
    # attempt created beats the older one it may have resumed.
    earlier = books.known_run_ids - {point.resume_run_id}
    for run in reversed(mr.sweep_point_runs(books.tracking_uri, books.experiment, books.sweep)):
        if (run.run_id not in earlier and run.overrides is not None
                and overrides_key(run.overrides) == point.key
                and run.tags.get(mr.PARENT_TAG) == books.parent_run_id):
            if run.status == "RUNNING":  # the process died without closing its run
                mr.mark_run_failed(books.tracking_uri, run.run_id, error)
            return run.run_id
    if status == "KILLED":
        return None
    return mr.record_failed_point(books.tracking_uri, books.experiment, books.parent_run_id,
                                  point.run_name, point.tags, error)


def _finish_parent(books: Books, done: Sequence[PointResult], stopped: str | None) -> None:
    from tinytale.mlflow_tracker import reader as mr

    failed = sum(r.status in ("FAILED", "KILLED") for r in done)
    status = "KILLED" if stopped else ("FAILED" if failed else "FINISHED")
    mr.finish_sweep_parent(books.tracking_uri, books.parent_run_id, status, {
        "points_total": books.total,
        "points_finished": sum(r.status == "FINISHED" for r in done),
        "points_skipped": sum(r.status == "SKIPPED" for r in done),
        "points_failed": failed,
    })
