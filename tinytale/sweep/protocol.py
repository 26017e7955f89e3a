"""The contract between a sweep and its point processes: how a child starts, how it ended.

A point is `tinytale train BASE --set ... --run-name NAME --experiment EXP --json`, run
locally or as a trainer container. It learns about the sweep from its environment
(`TINYTALE_PARENT_RUN_ID`, `TINYTALE_RUN_TAGS`, thread counts when points share the CPUs) and
reports back three ways: the summary JSON that `--json` prints as the last `{...}` line of
stdout, an `error: ...` line on stderr (which goes to the point's log), and its exit code
(0 finished, 130/143 stopped by a signal, anything else failed). Each attempt appends to the
point's log below a `==== ` header line, so a resumed point's log keeps every attempt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinytale.tracking import RunSummary

if TYPE_CHECKING:
    from tinytale.sweep.containers import ContainerPoints
    from tinytale.sweep.spec import SweepPoint, SweepSpec

PARENT_RUN_ID_ENV = "TINYTALE_PARENT_RUN_ID"  # the child nests its run under this one
RUN_TAGS_ENV = "TINYTALE_RUN_TAGS"  # JSON object of extra tags for the child's run
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # set only when points run side by side
KILLED_EXIT_CODES = (130, 143, -2, -15)  # SIGINT/SIGTERM: tinytale's exit codes, or the signal
_ATTEMPT = "\n==== "  # starts each attempt's part of a point's log


# --------------------------------------------------------------------------- starting a child


def point_tags(sweep: str, overrides: Mapping[str, Any]) -> dict[str, str]:
    """The tags that mark a run as this point of this sweep (what skipping matches on)."""
    from tinytale.mlflow_tracker.reader import OVERRIDES_TAG, SWEEP_TAG

    return {SWEEP_TAG: sweep, OVERRIDES_TAG: json.dumps(dict(overrides))}


def child_env(parent_run_id: str, tags: Mapping[str, str], threads: int | None,
              environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a point gets from the sweep; `threads` when points share the CPUs.

    A thread count already in `environ` wins over the sweep's share.
    """
    env = {PARENT_RUN_ID_ENV: parent_run_id, RUN_TAGS_ENV: json.dumps(dict(tags))}
    if threads is not None:
        for var in THREAD_ENVS:
            env[var] = environ.get(var, str(threads))
    return env


def train_args(spec: SweepSpec, point: SweepPoint, experiment: str) -> list[str]:
    """`tinytale train` options every point gets: its overrides, names, and `--json`."""
    return [*(arg for s in spec.set_args(point) for arg in ("--set", s)),
            "--run-name", point.run_name, "--experiment", experiment, "--json"]


def local_start(spec: SweepSpec, args: Sequence[str], out: Path, tracking_uri: str,
                resume_from: Path | None, extra_args: Sequence[str],
                point_env: Mapping[str, str], environ: Mapping[str, str],
                python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a point as a process on this machine.

    It inherits this process's environment (so test hooks such as tests/hold reach it).
    """
    command = [python, "-m", "tinytale", "train", str(spec.base), *args,
               "--out", str(out / spec.name), "--tracking-uri", tracking_uri,
               *(["--resume", str(resume_from)] if resume_from else []), *extra_args]
    return command, {**environ, **point_env, "MLFLOW_TRACKING_URI": tracking_uri}


def container_start(containers: ContainerPoints, args: Sequence[str], checkpoints: str,
                    resume: bool, extra_args: Sequence[str], point_env: Mapping[str, str],
                    environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a point as a trainer container.

    The point's variables travel as `--env` options; `resume` lets the container pick up
    the newest checkpoint in its (per-config) folder itself.
    """
    args = [*args, *(["--resume", "auto"] if resume else []), "--out", checkpoints, *extra_args]
    return containers.command(args, point_env), dict(environ)


def run_child(command: Sequence[str], env: Mapping[str, str], log_path: Path,
              watch: Callable[[subprocess.Popen], AbstractContextManager[Any]]
              ) -> ChildOutcome:
    """Run one attempt of a point to its end; `watch(proc)` spans its life (signals)."""
    with open(log_path, "ab") as log:  # appended: an earlier, stopped attempt stays
        log.write(f"{_ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{' '.join(command[1:])}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, env=dict(env))
        with watch(proc):
            stdout, _ = proc.communicate()
    return read_outcome(stdout.decode("utf-8", "replace"), proc.returncode, log_path)


# --------------------------------------------------------------------------- reading it back


@dataclass(frozen=True)
class ChildOutcome:
    """How a point's process ended, from its exit code, summary line and log."""

    status: str  # FINISHED | KILLED (by a signal; it saved a checkpoint) | FAILED
    returncode: int
    run_id: str | None = None
    best_epoch: int | None = None
    best_val_loss: float | None = None
    diverged: bool = False
    error: str | None = None  # FAILED: its `error:` line, else the end of its log


def read_outcome(stdout: str, returncode: int, log_path: Path) -> ChildOutcome:
    summary = parse_summary(stdout)
    status = status_of(returncode)
    return ChildOutcome(
        status, returncode, summary.run_id if summary else None,
        summary.best_epoch if summary else None, summary.best_val_loss if summary else None,
        bool(summary and summary.diverged),
        error_of(log_path, returncode) if status == "FAILED" else None)


def status_of(returncode: int) -> str:
    if returncode == 0:
        return "FINISHED"
    return "KILLED" if returncode in KILLED_EXIT_CODES else "FAILED"


def parse_summary(stdout: str) -> RunSummary | None:
    """The RunSummary `tinytale train --json` printed as its last `{...}` line (None: none)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                return None
            return RunSummary.from_json(data) if isinstance(data, dict) else None
    return None


def error_of(log_path: Path, returncode: int) -> str:
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
