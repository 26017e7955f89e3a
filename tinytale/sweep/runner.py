"""Running a sweep: each point in its own `tinytale train` process, tracked under one parent.

Skipping finished points, resuming stopped ones, recording failures and the exit code; the
file format and its checks live in `tinytale.sweep.spec`, running points in the compose
stack's containers instead of local processes in `tinytale.sweep.containers`, how a point's
process is started and read back in `tinytale.sweep.protocol`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinytale.checkpoint import find_resumable, peek_checkpoint
from tinytale.config import Config, ConfigError, load_config
from tinytale.errors import UserError
from tinytale.sweep import protocol
from tinytale.sweep.results import (
    MAX_EXIT_FAILED,
    PointResult,
    SweepResult,
    links,
    read_back_commands,
    render_results,
)
from tinytale.sweep.spec import SweepPoint, SweepSpec, overrides_key, resolved_overrides

__all__ = [
    "MAX_EXIT_FAILED", "PointResult", "SweepResult", "links", "point_config_hash",
    "read_back_commands", "render_results", "resumable_point", "run_sweep", "sweep_experiment",
]


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
        same = Config.from_dict(state.get("config")).hash() == config_hash
    except ConfigError:
        same = False
    if not same:
        return None, None, f"not resuming {path}: it was trained with another config"
    return path, state.get("run_id"), None


def sweep_experiment(spec: SweepSpec, override: str | None = None) -> str:
    return override or spec.experiment or load_config(spec.base).tracking.experiment


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
    containers = None
    if launch is not None:
        from tinytale.sweep.containers import prepare_containers

        containers = prepare_containers(spec.base, launch, tracking_uri)
        uri = containers.tracking_uri
    else:
        uri = mr.tracking_uri_or_default(tracking_uri)
    exp_name = sweep_experiment(spec, experiment)
    resolved = [resolved_overrides(spec, p) for p in spec.points]
    keys = [overrides_key(r) for r in resolved]
    # What each point's run would be now; an edited base file or `set` changes it.
    hashes = [point_config_hash(spec, p, exp_name) for p in spec.points]

    before = mr.sweep_point_runs(uri, exp_name, spec.name)
    finished: dict[str, list[Any]] = {}  # overrides key -> its finished runs, oldest first
    for run in before:
        if run.status == "FINISHED" and run.overrides is not None:
            finished.setdefault(overrides_key(run.overrides), []).append(run)
    parent_id = mr.start_sweep_parent(uri, exp_name, spec.name, {
        "sweep.base": str(spec.base), "sweep.points": len(spec.points),
        "sweep.grid_keys": ",".join(dict.fromkeys(k for p in spec.points for k in p.overrides)),
    }, spec.text)
    exp_id = mr.ensure_experiment(uri, exp_name)
    for line in links(uri, exp_id, spec.name, parent_id):
        echo(line)
    known_ids = {r.run_id for r in before}
    log_dir = out / spec.name / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    total = len(spec.points)
    results: list[PointResult | None] = [None] * total
    todo = []
    for i, (point, key) in enumerate(zip(spec.points, keys, strict=True)):
        # The newest finished run with the point's current config (runs from before the
        # config_hash tag count as current).
        runs = finished.get(key, [])
        same = [r for r in runs if r.tags.get("config_hash") in (None, hashes[i])]
        done = same[-1] if same else None
        if done is None and runs:
            echo(f"[{i + 1}/{total}] {point.run_name}: finished in run {runs[-1].run_id} with "
                 "another config (the base file or the sweep's set changed); running it "
                 "again")
        if done is not None and not rerun:
            results[i] = PointResult(
                i + 1, point.run_name, resolved[i], "SKIPPED", done.run_id,
                best_val_loss=_best_val_loss(done),
                error=None)
            echo(f"[{i + 1}/{total}] {point.run_name}: already finished in run "
                 f"{done.run_id}, skipped (--rerun runs it again)")
        else:
            todo.append(i)

    procs = _Processes()
    threads_each = max(1, (os.cpu_count() or 1) // min(parallel, max(1, len(todo))))

    def run_point(i: int) -> PointResult:
        point = spec.points[i]
        label = f"[{i + 1}/{total}] {point.run_name}"
        if procs.stopped:
            return PointResult(i + 1, point.run_name, resolved[i], "NOT_STARTED",
                               error=f"sweep stopped by {procs.stopped}")
        tags = protocol.point_tags(spec.name, resolved[i])
        try:  # a point whose config is invalid fails here, without starting a process
            load_config(spec.base, spec.set_args(point))
        except ConfigError as exc:
            result = PointResult(i + 1, point.run_name, resolved[i], "FAILED", error=str(exc))
            result.run_id = mr.record_failed_point(uri, exp_name, parent_id, point.run_name,
                                                   tags, str(exc))
            echo(f"{label}: FAILED ({exc})")
            return result
        resume_from, resumed_id = None, None
        train_args = protocol.train_args(spec, point, exp_name)
        point_env = protocol.child_env(parent_id, tags, threads_each if parallel > 1 else None,
                                       os.environ)
        if containers is not None:
            # Checkpoints are in the stack's volume, out of the host's sight: the container
            # looks for one itself, in a folder of the point's config alone.
            checkpoints = containers.point_out(spec.name, hashes[i])
            if not rerun:
                resumed_id = _unfinished_run(before, keys[i], hashes[i])
            cmd, env = protocol.container_start(containers, train_args, checkpoints, not rerun,
                                                extra_args, point_env, os.environ)
        else:
            checkpoints = str(out / spec.name / point.run_name)
            if not rerun:
                resume_from, resumed_id, why_not = resumable_point(Path(checkpoints), hashes[i])
                if why_not:
                    echo(f"{label}: {why_not}")
            cmd, env = protocol.local_start(spec, train_args, out, uri, resume_from, extra_args,
                                            point_env, os.environ)
        log_path = log_dir / f"{point.run_name}.log"
        where = f" in a {containers.stack.device} container" if containers else ""
        echo(f"{label}: " + (f"resuming run {resumed_id} from {resume_from}"
                             if resume_from else "started") + f"{where} (log: {log_path})")
        start = time.monotonic()
        outcome = protocol.run_child(cmd, env, log_path, procs.watch)
        seconds = round(time.monotonic() - start, 2)
        result = PointResult(i + 1, point.run_name, resolved[i], outcome.status,
                             outcome.run_id, outcome.best_epoch, outcome.best_val_loss,
                             seconds, str(log_path), diverged=outcome.diverged)
        if outcome.status != "FINISHED":
            result.error = (f"stopped by {procs.stopped or 'a signal'}; its checkpoint is in "
                            f"{checkpoints}" if outcome.status == "KILLED" else outcome.error)
            result.run_id = _record_failure(mr, uri, exp_name, spec.name, parent_id,
                                            known_ids - {resumed_id}, keys[i], point.run_name,
                                            tags, result.error, result.status)
        best = (f", best val_loss {result.best_val_loss:.4f} at epoch {result.best_epoch}"
                if result.best_val_loss is not None else "")
        echo(f"{label}: {result.status} in {seconds:.1f}s{best}"
             + (f" ({result.error})" if result.error else ""))
        return result

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        echo(f"{name} received: stopping the running points (they save a checkpoint)")
        procs.stop(name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for i, result in zip(todo, pool.map(run_point, todo), strict=True):
                results[i] = result
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        done = [r for r in results if r is not None]
        failed = sum(r.status in ("FAILED", "KILLED") for r in done)
        status = "KILLED" if procs.stopped else ("FAILED" if failed else "FINISHED")
        mr.finish_sweep_parent(uri, parent_id, status, {
            "points_total": total,
            "points_finished": sum(r.status == "FINISHED" for r in done),
            "points_skipped": sum(r.status == "SKIPPED" for r in done),
            "points_failed": failed,
        })
    return SweepResult(spec.name, exp_name, parent_id, [r for r in results if r is not None],
                       procs.stopped, uri, exp_id)


def _best_val_loss(run: Any) -> float | None:
    """A finished run's best validation loss: its summary tag (older runs: the metric)."""
    value = run.tags.get("tinytale.best_val_loss") or run.latest.get("best_val_loss")
    return None if value is None else float(value)


def _unfinished_run(runs: Sequence[Any], key: str, config_hash: str | None) -> str | None:
    """The newest earlier run of a point, same config, not FINISHED: what a resume continues."""
    for run in reversed(runs):
        if (run.overrides is not None and overrides_key(run.overrides) == key
                and run.tags.get("config_hash") == config_hash and run.status != "FINISHED"):
            return run.run_id
    return None


def _record_failure(mr: Any, uri: str, experiment: str, sweep: str, parent_id: str,
                    known_ids: set[str], key: str, run_name: str, tags: dict[str, str],
                    error: str, status: str) -> str | None:
    """Make sure the failed point has a FAILED (or KILLED) child run, and return its id."""
    # Newest first: a run this attempt created beats the older one it may have resumed.
    for run in reversed(mr.sweep_point_runs(uri, experiment, sweep)):
        if (run.run_id not in known_ids and run.overrides is not None
                and overrides_key(run.overrides) == key
                and run.tags.get(mr.PARENT_TAG) == parent_id):
            if run.status == "RUNNING":  # the process died without closing its run
                mr.mark_run_failed(uri, run.run_id, error)
            return run.run_id
    if status == "KILLED":
        return None
    return mr.record_failed_point(uri, experiment, parent_id, run_name, tags, error)
