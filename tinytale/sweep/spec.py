"""Sweep files: a base experiment times a grid (or list) of overrides, read and checked.

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
own process (or trainer container, `--launch`), nested under the sweep's parent run and tagged
`tinytale.sweep` (the name) and `tinytale.overrides` (JSON of the point's overrides); its run
is named after its overrides, e.g. `dropout=0.2,weight_decay=0.1`. A point already FINISHED
in the sweep (same overrides) is skipped unless `rerun`; a failing point is recorded as a
FAILED run and the sweep goes on.
A point that was stopped before it finished (SIGTERM to the sweep, a crash) resumes from its
newest checkpoint into the same MLflow run the next time the sweep runs, unless `rerun`.
Both rules hold only while the point's config is unchanged (its `config_hash` tag): after an
edit to the base file or `set`, the point runs again from scratch.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinytale.config import (
    ConfigError,
    UnknownKeyError,
    check_key,
    describe_yaml_error,
    known_keys,
    load_config,
)
from tinytale.errors import UserError

SWEEP_KEYS = ("name", "base", "experiment", "set", "grid", "points")
RESERVED_KEYS = {"tracking.run_name", "tracking.experiment"}  # the sweep sets these itself
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


def _check_key(key: Any, where: str, source: Path) -> str:
    if not isinstance(key, str) or key.count(".") != 1:
        raise SweepError(f"{where} in sweep file '{source}' has key {key!r}; keys are "
                         "section.key, e.g. model.dropout.")
    section, name = key.split(".")
    try:
        check_key(section, name)
    except UnknownKeyError as exc:
        if not exc.section_known:
            raise SweepError(f"{where} in sweep file '{source}' has unknown section in "
                             f"'{key}'; sections are {', '.join(known_keys())}.") from None
        hint = f" (did you mean '{section}.{exc.close}'?)" if exc.close else ""
        raise SweepError(f"{where} in sweep file '{source}' has unknown key '{key}'{hint}; "
                         f"fix the name.") from None
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
        raise SweepError(describe_yaml_error(f"sweep file '{source}'", exc)) from None
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
