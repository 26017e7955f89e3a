"""Deciding what a sweep does with each point: skip it, resume it, or run it afresh, and how.

Pure: it reads no files, asks no server and starts nothing. The runner gathers what it needs
(each point's config hash, the point runs already on the server, the unfinished checkpoints
on disk) and the executor carries out the plan. The rules:

* a point FINISHED before with its current config (`config_hash` tag; runs from before that
  tag count as current) is skipped, unless `rerun`;
* a point finished only with another config (the base file or `set` changed) runs again;
* a point stopped part-way with its current config resumes: locally from the checkpoint in
  its folder, in a container from its per-config folder (`--resume auto`) into its
  unfinished run; `rerun` starts every point afresh;
* a point whose config is invalid fails without a process.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinytale.compare import RunCurves
from tinytale.sweep import protocol
from tinytale.sweep.containers import ContainerPoints
from tinytale.sweep.spec import SweepPoint, SweepSpec, overrides_key


@dataclass(frozen=True)
class PointFacts:
    """What the runner found out about one point before planning."""

    point: SweepPoint
    overrides: dict[str, Any]  # as the config reads them (spec.resolved_overrides)
    config_hash: str | None  # its run's `config_hash` tag as of now; None: invalid config
    config_error: str | None = None  # why its config is invalid

    @property
    def key(self) -> str:
        return overrides_key(self.overrides)


@dataclass(frozen=True)
class Resumable:
    """The unfinished checkpoint in a local point's folder (runner.resumable_point)."""

    path: Path | None = None
    run_id: str | None = None  # the run it belongs to
    why_not: str | None = None  # there is one, trained with another config: not resumed


@dataclass(frozen=True)
class Decision:
    """Skip, fail or run one point; the first step of the plan (see `decide`)."""

    action: str  # skip | invalid | run
    finished: RunCurves | None = None  # skip: the finished run that stands for the point
    message: str | None = None  # said when the sweep starts


@dataclass(frozen=True)
class Target:
    """Where and how the sweep's points run: everything the plan needs but the points."""

    spec: SweepSpec
    experiment: str
    parent_run_id: str
    tracking_uri: str
    out: Path
    parallel: int = 1
    rerun: bool = False
    extra_args: tuple[str, ...] = ()
    containers: ContainerPoints | None = None  # None: processes on this machine
    environ: Mapping[str, str] = field(default_factory=dict)  # what the points inherit
    cpu_count: int | None = 1
    python: str = sys.executable

    @property
    def log_dir(self) -> Path:
        return self.out / self.spec.name / "logs"

    def local_folder(self, point: SweepPoint) -> Path:
        """A local point's checkpoints: one folder per point, whatever its config."""
        return self.out / self.spec.name / point.run_name


@dataclass(frozen=True)
class PlannedPoint:
    """One point as the executor carries it out."""

    index: int  # 0-based, in the sweep file's order
    run_name: str
    overrides: dict[str, Any]
    key: str  # overrides_key: how its runs on the server are matched
    action: str  # skip | invalid | resume | fresh
    log: Path  # its process's stderr, every attempt appended
    message: str | None = None  # said when the sweep starts
    finished: RunCurves | None = None  # skip: the run that stands for it
    config_error: str | None = None  # invalid: why
    tags: dict[str, str] = field(default_factory=dict)
    resume_run_id: str | None = None  # resume: the run it continues
    resume_from: Path | None = None  # resume on this machine: the checkpoint
    note: str | None = None  # said when it starts: a checkpoint it does not resume
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    checkpoints: str = ""  # where its checkpoints go (named when it is stopped)
    where: str = ""  # " in a cpu container", or "" for a local process


def decide(facts: Sequence[PointFacts], before: Sequence[RunCurves], rerun: bool
           ) -> list[Decision]:
    """Skip, fail or run each point, given the sweep's point runs already on the server."""
    finished: dict[str, list[RunCurves]] = {}  # overrides key -> its finished runs, oldest first
    for run in before:
        if run.status == "FINISHED" and run.overrides is not None:
            finished.setdefault(overrides_key(run.overrides), []).append(run)
    total = len(facts)
    return [_decide_one(f"[{i + 1}/{total}] {fact.point.run_name}", fact,
                        finished.get(fact.key, []), rerun)
            for i, fact in enumerate(facts)]


def _decide_one(label: str, fact: PointFacts, runs: list[RunCurves], rerun: bool) -> Decision:
    # The newest finished run with the point's current config (runs from before the
    # config_hash tag count as current).
    same = [r for r in runs if r.tags.get("config_hash") in (None, fact.config_hash)]
    done = same[-1] if same else None
    if done is not None and not rerun:
        return Decision("skip", done, f"{label}: already finished in run {done.run_id}, "
                                      "skipped (--rerun runs it again)")
    message = None
    if done is None and runs:
        message = (f"{label}: finished in run {runs[-1].run_id} with another config (the base "
                   "file or the sweep's set changed); running it again")
    return Decision("run" if fact.config_error is None else "invalid", None, message)


def checkpoint_folders(target: Target, facts: Sequence[PointFacts],
                       decisions: Sequence[Decision]) -> dict[int, Path]:
    """The local folders whose unfinished checkpoint the plan needs, by point index
    (none with --rerun, none in containers: those look for one themselves)."""
    if target.rerun or target.containers is not None:
        return {}
    return {i: target.local_folder(fact.point)
            for i, (fact, decision) in enumerate(zip(facts, decisions, strict=True))
            if decision.action == "run"}


def plan_sweep(target: Target, facts: Sequence[PointFacts], before: Sequence[RunCurves],
               decisions: Sequence[Decision], checkpoints: Mapping[int, Resumable]
               ) -> list[PlannedPoint]:
    """Every point's plan: its action and, for those that run, their command and env."""
    running = sum(d.action != "skip" for d in decisions)
    # Points side by side share the CPUs instead of each taking all of them.
    threads = (max(1, (target.cpu_count or 1) // min(target.parallel, max(1, running)))
               if target.parallel > 1 else None)
    return [_plan_one(target, i, fact, decision, before, checkpoints.get(i, Resumable()),
                      threads)
            for i, (fact, decision) in enumerate(zip(facts, decisions, strict=True))]


def _plan_one(target: Target, index: int, fact: PointFacts, decision: Decision,
              before: Sequence[RunCurves], found: Resumable, threads: int | None
              ) -> PlannedPoint:
    name = fact.point.run_name
    tags = protocol.point_tags(target.spec.name, fact.overrides)
    planned = PlannedPoint(index, name, fact.overrides, fact.key, decision.action,
                           target.log_dir / f"{name}.log", decision.message, tags=tags)
    if decision.action == "skip":
        return replace(planned, finished=decision.finished)
    if decision.action == "invalid":
        return replace(planned, config_error=fact.config_error)
    point_env = protocol.child_env(target.parent_run_id, tags, threads, target.environ)
    args = protocol.train_args(target.spec, fact.point, target.experiment)
    if target.containers is not None:
        return _in_container(target, target.containers, planned, fact, before, args,
                             point_env)
    return _on_this_machine(target, planned, fact, Resumable() if target.rerun else found,
                            args, point_env)


def _in_container(target: Target, containers: ContainerPoints, planned: PlannedPoint,
                  fact: PointFacts, before: Sequence[RunCurves], args: list[str],
                  point_env: dict[str, str]) -> PlannedPoint:
    # Checkpoints are in the stack's volume, out of the host's sight: the container looks
    # for one itself, in a folder of the point's config alone.
    checkpoints = containers.point_out(target.spec.name, fact.config_hash)
    resumed = None if target.rerun else unfinished_run(before, fact.key, fact.config_hash)
    command, env = protocol.container_start(containers, args, checkpoints, not target.rerun,
                                            target.extra_args, point_env, target.environ)
    return replace(planned, action="resume" if resumed else "fresh", resume_run_id=resumed,
                   command=tuple(command), env=env, checkpoints=checkpoints,
                   where=f" in a {containers.stack.device} container")


def _on_this_machine(target: Target, planned: PlannedPoint, fact: PointFacts,
                     found: Resumable, args: list[str], point_env: dict[str, str]
                     ) -> PlannedPoint:
    command, env = protocol.local_start(target.spec, args, target.out, target.tracking_uri,
                                        found.path, target.extra_args, point_env,
                                        target.environ, target.python)
    return replace(planned, action="resume" if found.path else "fresh",
                   resume_run_id=found.run_id, resume_from=found.path, note=found.why_not,
                   command=tuple(command), env=env,
                   checkpoints=str(target.local_folder(fact.point)))


def unfinished_run(runs: Sequence[RunCurves], key: str, config_hash: str | None) -> str | None:
    """The newest earlier run of a point, same config, not FINISHED: what a resume continues."""
    for run in reversed(runs):
        if (run.overrides is not None and overrides_key(run.overrides) == key
                and run.tags.get("config_hash") == config_hash and run.status != "FINISHED"):
            return run.run_id
    return None
