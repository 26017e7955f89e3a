"""Sweeps: a base experiment times a grid (or list) of overrides, one MLflow child run per point.

A sweep file (YAML):

    name: regularization            # required; letters, digits, '.', '_' and '-'
    base: overfit.yaml              # required; relative to this file, else to the cwd
    experiment: tinytale-overfit    # optional; default: the base config's tracking.experiment
    set:                            # optional overrides shared by every point
      train.epochs: 120
    grid:                           # optional: every combination (first key varies slowest)
      model.dropout: [0.0, 0.2]
      train.weight_decay: [0.0, 0.1]
    points:                         # optional: extra points, each its own overrides
      - {model.n_layer: 2}

`grid` and `points` may be combined (the grid's points come first); at least one is needed.
A point's overrides win over `set`. Each point runs as `tinytale train BASE --set ...` in its
own process, nested under the sweep's parent run and tagged `tinytale.sweep` (the name) and
`tinytale.overrides` (JSON of the point's overrides); its run is named after its overrides,
e.g. `dropout=0.2,weight_decay=0.1`. A point already FINISHED in the sweep (same overrides)
is skipped unless `rerun`; a failing point is recorded as a FAILED run and the sweep goes on.
A point that was stopped before it finished (SIGTERM to the sweep, a crash) resumes from its
newest checkpoint into the same MLflow run the next time the sweep runs, unless `rerun`.
Both rules hold only while the point's config is unchanged (its `config_hash` tag): after an
edit to the base file or `set`, the point runs again from scratch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinytale.checkpoint import find_resumable, peek_checkpoint
from tinytale.config import Config, ConfigError, load_config
from tinytale.errors import UserError

SWEEP_KEYS = ("name", "base", "experiment", "set", "grid", "points")
RESERVED_KEYS = {"tracking.run_name", "tracking.experiment"}  # the sweep sets these itself
MAX_EXIT_FAILED = 125  # exit codes 126-255 mean "cannot execute" and signals to shells
_ATTEMPT = "\n==== "  # starts each attempt's part of a point's log
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(UserError):
    """A mistake in a sweep file; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------- the spec


@dataclass
class SweepPoint:
    """One point: its own overrides (dotted key -> value), in the order the file gives them."""

    overrides: dict[str, Any]

    @property
    def run_name(self) -> str:
        return point_run_name(self.overrides)


@dataclass
class SweepSpec:
    name: str
    base: Path
    source: Path
    text: str  # the sweep file as written, logged to the parent run
    experiment: str | None = None
    common: dict[str, Any] = field(default_factory=dict)
    points: list[SweepPoint] = field(default_factory=list)

    def set_args(self, point: SweepPoint) -> list[str]:
        """`--set` strings for a point: the shared overrides, then the point's own."""
        merged = {**self.common, **point.overrides}
        return [f"{key}={json.dumps(value)}" for key, value in merged.items()]


def known_keys() -> dict[str, set[str]]:
    """Every `section.key` a config has: {'model': {'n_layer', ...}, ...}."""
    hints = typing.get_type_hints(Config)
    return {f.name: {g.name for g in dataclasses.fields(hints[f.name])}
            for f in dataclasses.fields(Config)}


def _check_key(key: Any, where: str, source: Path) -> str:
    import difflib

    if not isinstance(key, str) or key.count(".") != 1:
        raise SweepError(f"{where} in sweep file '{source}' has key {key!r}; keys are "
                         "section.key, e.g. model.dropout.")
    section, name = key.split(".")
    keys = known_keys()
    if section not in keys:
        raise SweepError(f"{where} in sweep file '{source}' has unknown section in '{key}'; "
                         f"sections are {', '.join(keys)}.")
    if name not in keys[section]:
        close = difflib.get_close_matches(name, keys[section], n=1)
        hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
        raise SweepError(f"{where} in sweep file '{source}' has unknown key '{key}'{hint}; "
                         f"fix the name.")
    if key in RESERVED_KEYS:
        raise SweepError(f"{where} in sweep file '{source}' sets '{key}', which the sweep "
                         "sets itself; use the sweep's name/experiment fields instead.")
    return key


def _check_scalar(value: Any, key: str, where: str, source: Path) -> Any:
    if isinstance(value, dict | list):
        raise SweepError(f"{where} in sweep file '{source}' gives {key} the value {value!r}; "
                         "values must be single numbers, strings, booleans or null.")
    return value


def _mapping(raw: Any, where: str, source: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"'{where}' in sweep file '{source}' must be a mapping of "
                         f"section.key to values, got {type(raw).__name__}.")
    return raw


def expand_grid(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values; the first key varies slowest."""
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(grid[k] for k in keys))]


def point_run_name(overrides: dict[str, Any]) -> str:
    """`{'model.dropout': 0.2, 'train.weight_decay': 0.1}` -> `dropout=0.2,weight_decay=0.1`.

    The run name is also a folder name, so '/' and other path characters become '_'.
    """
    from tinytale.compare import format_overrides

    name = format_overrides(overrides) or "base"
    return re.sub(r"[/\\:\s]", "_", name)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; every mistake is a `SweepError` (exit code 2)."""
    source = Path(path)
    if not source.is_file():
        raise SweepError(f"sweep file '{source}' does not exist; pass a YAML file such as "
                         "experiments/sweep_regularization.yaml.")
    text = source.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepError(f"sweep file '{source}' is not valid YAML{where}; fix the syntax "
                         "there.") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file '{source}' must be a mapping with keys "
                         f"{', '.join(SWEEP_KEYS)}.")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise SweepError(f"sweep file '{source}' has unknown key '{key}'; the keys are "
                             f"{', '.join(SWEEP_KEYS)}.")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweepError(f"sweep file '{source}' needs a name: made of letters, digits, '.', "
                         f"'_' and '-' (got {name!r}).")
    base_raw = raw.get("base")
    if not isinstance(base_raw, str) or not base_raw.strip():
        raise SweepError(f"sweep file '{source}' needs base: the experiment YAML to start "
                         "from, e.g. base: overfit.yaml.")
    base = _resolve_base(base_raw, source)
    experiment = raw.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()):
        raise SweepError(f"experiment in sweep file '{source}' must be a non-empty name.")

    common = {}
    for key, value in _mapping(raw.get("set"), "set", source).items():
        common[_check_key(key, "set", source)] = _check_scalar(value, key, "set", source)

    grid: dict[str, list[Any]] = {}
    for key, values in _mapping(raw.get("grid"), "grid", source).items():
        _check_key(key, "grid", source)
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid key {key} in sweep file '{source}' needs a non-empty list "
                             f"of values, e.g. {key}: [0.0, 0.1].")
        grid[key] = [_check_scalar(v, key, "grid", source) for v in values]

    listed = raw.get("points")
    if listed is None:
        listed = []
    if not isinstance(listed, list):
        raise SweepError(f"points in sweep file '{source}' must be a list of mappings, "
                         "e.g. points: [{model.dropout: 0.1}].")
    overrides_list = expand_grid(grid)
    for i, item in enumerate(listed, 1):
        where = f"point {i}"
        item = _mapping(item, where, source)
        overrides_list.append({_check_key(k, where, source): _check_scalar(v, k, where, source)
                               for k, v in item.items()})
    if not overrides_list:
        raise SweepError(f"sweep file '{source}' has no points; add a grid: or points: "
                         "section.")
    points: list[SweepPoint] = []
    seen: dict[str, int] = {}
    for overrides in overrides_list:
        key = overrides_key(overrides)
        if key in seen:
            raise SweepError(f"sweep file '{source}' lists the point "
                             f"{point_run_name(overrides)} twice; remove the duplicate.")
        seen[key] = len(points)
        points.append(SweepPoint(overrides))
    names = [p.run_name for p in points]
    if len(set(names)) != len(names):
        raise SweepError(f"sweep file '{source}' has points whose run names collide; make "
                         "their overrides distinct.")
    spec = SweepSpec(name=name, base=base, source=source, text=text,
                     experiment=experiment, common=common, points=points)
    # The base with the shared overrides must be a valid experiment; single points may fail.
    load_config(base, spec.set_args(SweepPoint({})))
    return spec


def _resolve_base(base: str, source: Path) -> Path:
    for candidate in (source.parent / base, Path(base)):
        if candidate.is_file():
            return candidate
    raise SweepError(f"base '{base}' of sweep file '{source}' is neither next to the sweep "
                     "file nor relative to the current folder; fix the path.")


def overrides_key(overrides: dict[str, Any]) -> str:
    """Order-independent identity of a point's overrides (used to skip finished points)."""
    return json.dumps(overrides, sort_keys=True)


def resolved_overrides(spec: SweepSpec, point: SweepPoint) -> dict[str, Any]:
    """The point's overrides as the config reads them (0 -> 0.0 for a float field, ...).

    A point whose config is invalid keeps its values as written.
    """
    try:
        flat = load_config(spec.base, spec.set_args(point)).flat()
    except ConfigError:
        return dict(point.overrides)
    return {key: flat.get(key, value) for key, value in point.overrides.items()}


# --------------------------------------------------------------------------- running


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SweepResult:
    name: str
    experiment: str
    parent_run_id: str
    points: list[PointResult]
    interrupted: str | None = None  # the signal name when the sweep was stopped

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

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.add(proc)

    def remove(self, proc: subprocess.Popen) -> None:
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
) -> SweepResult:
    """Run every point not yet finished, `parallel` at a time, each in its own process."""
    from tinytale.mlflow_tracker import reader as mr

    if parallel < 1:
        raise UserError(f"--parallel {parallel} must be at least 1.")
    uri = mr.tracking_uri_or_default(tracking_uri)
    exp_name = sweep_experiment(spec, experiment)
    resolved = [resolved_overrides(spec, p) for p in spec.points]
    keys = [overrides_key(r) for r in resolved]
    # What each point's run would be now; an edited base file or `set` changes it.
    hashes = [point_config_hash(spec, p, exp_name) for p in spec.points]

    before = mr.sweep_point_runs(uri, exp_name, spec.name)
    finished = {}
    for run in before:
        if run.status == "FINISHED" and run.overrides is not None:
            finished.setdefault(overrides_key(run.overrides), run)
    parent_id = mr.start_sweep_parent(uri, exp_name, spec.name, {
        "sweep.base": str(spec.base), "sweep.points": len(spec.points),
        "sweep.grid_keys": ",".join(dict.fromkeys(k for p in spec.points for k in p.overrides)),
    }, spec.text)
    known_ids = {r.run_id for r in before}
    log_dir = out / spec.name / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    total = len(spec.points)
    results: list[PointResult | None] = [None] * total
    todo = []
    for i, (point, key) in enumerate(zip(spec.points, keys, strict=True)):
        done = finished.get(key)
        if done is not None and done.tags.get("config_hash") not in (None, hashes[i]):
            echo(f"[{i + 1}/{total}] {point.run_name}: finished in run {done.run_id} with "
                 "another config (the base file or the sweep's set changed); running it "
                 "again")
            done = None
        if done is not None and not rerun:
            results[i] = PointResult(
                i + 1, point.run_name, resolved[i], "SKIPPED", done.run_id,
                best_val_loss=done.latest.get("best_val_loss"),
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
        tags = {mr.SWEEP_TAG: spec.name, mr.OVERRIDES_TAG: json.dumps(resolved[i])}
        try:  # a point whose config is invalid fails here, without starting a process
            load_config(spec.base, spec.set_args(point))
        except ConfigError as exc:
            result = PointResult(i + 1, point.run_name, resolved[i], "FAILED", error=str(exc))
            result.run_id = mr.record_failed_point(uri, exp_name, parent_id, point.run_name,
                                                   tags, str(exc))
            echo(f"{label}: FAILED ({exc})")
            return result
        resume_from, resumed_id = None, None
        if not rerun:
            resume_from, resumed_id, why_not = resumable_point(out / spec.name / point.run_name,
                                                               hashes[i])
            if why_not:
                echo(f"{label}: {why_not}")
        cmd = [sys.executable, "-m", "tinytale", "train", str(spec.base),
               *(arg for s in spec.set_args(point) for arg in ("--set", s)),
               "--run-name", point.run_name, "--experiment", exp_name,
               "--out", str(out / spec.name), "--tracking-uri", uri, "--json",
               *(["--resume", str(resume_from)] if resume_from else []), *extra_args]
        env = {**os.environ, "TINYTALE_PARENT_RUN_ID": parent_id,
               "TINYTALE_RUN_TAGS": json.dumps(tags), "MLFLOW_TRACKING_URI": uri}
        if parallel > 1:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, str(threads_each))
        log_path = log_dir / f"{point.run_name}.log"
        echo(f"{label}: " + (f"resuming run {resumed_id} from {resume_from}"
                             if resume_from else "started") + f" (log: {log_path})")
        start = time.monotonic()
        with open(log_path, "ab") as log:  # appended: an earlier, stopped attempt stays
            log.write(f"{_ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"{' '.join(cmd[1:])}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
            procs.add(proc)
            try:
                stdout, _ = proc.communicate()
            finally:
                procs.remove(proc)
        seconds = round(time.monotonic() - start, 2)
        summary = _last_json(stdout.decode("utf-8", "replace"))
        result = PointResult(i + 1, point.run_name, resolved[i], "FINISHED",
                             summary.get("run_id"), summary.get("best_epoch"),
                             summary.get("best_val_loss"), seconds, str(log_path))
        if proc.returncode != 0:
            killed = proc.returncode in (130, 143, -2, -15)
            result.status = "KILLED" if killed else "FAILED"
            result.error = (f"stopped by {procs.stopped or 'a signal'}; its checkpoint is in "
                            f"{out / spec.name / point.run_name}" if killed
                            else _error_of(log_path, proc.returncode))
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
                       procs.stopped)


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def _error_of(log_path: Path, returncode: int) -> str:
    """The `error: ...` line the failed process printed, else the end of its log."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    # Only this attempt's part: the log keeps earlier attempts above a "==== " line.
    _, header, part = text.rpartition(_ATTEMPT)
    lines = part.strip().splitlines()[1 if header else 0:]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    tail = " | ".join(lines[-3:]) if lines else "no output"
    return f"exit code {returncode}: {tail}"[:2000]


def _record_failure(mr: Any, uri: str, experiment: str, sweep: str, parent_id: str,
                    known_ids: set[str], key: str, run_name: str, tags: dict[str, str],
                    error: str, status: str) -> str | None:
    """Make sure the failed point has a FAILED (or KILLED) child run, and return its id."""
    for run in mr.sweep_point_runs(uri, experiment, sweep):
        if (run.run_id not in known_ids and run.overrides is not None
                and overrides_key(run.overrides) == key
                and run.tags.get(mr.PARENT_TAG) == parent_id):
            if run.status == "RUNNING":  # the process died without closing its run
                mr.mark_run_failed(uri, run.run_id, error)
            return run.run_id
    if status == "KILLED":
        return None
    return mr.record_failed_point(uri, experiment, parent_id, run_name, tags, error)


def render_results(result: SweepResult) -> str:
    rows = [("#", "run", "status", "best_epoch", "best_val_loss", "seconds", "run_id")]
    for p in result.points:
        rows.append((str(p.index), p.run_name, p.status,
                     "-" if p.best_epoch is None else str(p.best_epoch),
                     "-" if p.best_val_loss is None else f"{p.best_val_loss:.4f}",
                     f"{p.seconds:.1f}" if p.seconds else "-", p.run_id or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    stopped = f", stopped by {result.interrupted}" if result.interrupted else ""
    lines.append(f"sweep '{result.name}' in experiment '{result.experiment}', parent run "
                 f"{result.parent_run_id}: {result.failed} failed{stopped}")
    return "\n".join(lines)
