"""Reading runs back for sweeps and `tinytale compare`: the query side of the MLflow package.

Plain functions of a tracking URI. They translate MLflow entities into the plain data of
`tinytale.compare` and raise `UserError` for what a user can fix (unknown experiment, run or
sweep; a server that cannot be reached or refuses the credentials).

Tags written and read here:
* sweep parent run: `tinytale.sweep_parent` = sweep name (and the run is named after it)
* sweep point run:  `tinytale.sweep` = sweep name, `tinytale.overrides` = JSON of the point's
  overrides, `mlflow.parentRunId` = the parent run (set by the tracker or by us for failures)
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tinytale.compare import RunCurves, clean_series
from tinytale.errors import UserError
from tinytale.mlflow_tracker import connection
from tinytale.mlflow_tracker.connection import explain, make_client, use_mlflow_settings
from tinytale.mlflow_tracker.uris import missing_hint, require_store, resolve_tracking_uri

SWEEP_TAG = "tinytale.sweep"
SWEEP_PARENT_TAG = "tinytale.sweep_parent"
OVERRIDES_TAG = "tinytale.overrides"
ERROR_TAG = "tinytale.error"
PARENT_TAG = "mlflow.parentRunId"

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_F = TypeVar("_F", bound=Callable[..., Any])
_BULK_MAX_RUNS = 100  # the server's limit per get-history-bulk-interval request
_BULK_MAX_STEPS = 2500  # the server's limit of values per run and request


def summary_tag(key: str) -> str:
    """The tag that holds a run's summary number `key` (best_val_loss, best_epoch, epochs)."""
    return f"tinytale.{key}"


def summary_number(tags: dict[str, str], metrics: dict[str, float], key: str
                   ) -> float | None:
    """A run's summary number: its tag, or the metric that runs logged before the summary left
    the charts."""
    value = tags.get(summary_tag(key))
    if value is None:
        value = metrics.get(key)
    return None if value is None else float(value)


def tracking_uri_or_default(uri: str | None) -> str:
    """The URI given, else MLFLOW_TRACKING_URI, else ./mlflow.db, exactly as `train` does."""
    return resolve_tracking_uri(uri)


def _server_errors(func: _F) -> _F:
    """Raise `UserError` instead of MLflow's traceback when the server is down or refuses us."""

    @functools.wraps(func)
    def wrapper(tracking_uri: str | None, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(tracking_uri, *args, **kwargs)
        except Exception as exc:
            problem = explain(exc, tracking_uri_or_default(tracking_uri))
            if problem is None:
                raise
            raise UserError(problem) from None

    return wrapper  # type: ignore[return-value]


def _quote(value: str) -> str:
    if "'" in value:
        raise UserError(f"'{value}' contains a single quote, which MLflow search filters "
                        "cannot hold; rename it.")
    return f"'{value}'"


def _experiment_ids(client: Any, experiment: str | None, uri: str = "") -> list[str]:
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            hint = missing_hint(uri) if uri else ""
            raise UserError(f"MLflow experiment '{experiment}' does not exist at this tracking "
                            f"URI; check --experiment and --tracking-uri{hint}.")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]


def _search(client: Any, experiment_ids: Sequence[str], filter_string: str = "",
            max_results: int | None = None, order_by: Sequence[str] = ("attributes.start_time ASC",)
            ) -> list[Any]:
    """All runs matching the filter (paged), oldest first unless `order_by` says otherwise."""
    runs: list[Any] = []
    token = None
    while True:
        page_size = 1000 if max_results is None else min(1000, max_results - len(runs))
        page = client.search_runs(list(experiment_ids), filter_string, max_results=page_size,
                                  order_by=list(order_by), page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs


def _to_curves(run: Any) -> RunCurves:
    tags = run.data.tags
    overrides = None
    if OVERRIDES_TAG in tags:
        try:
            overrides = json.loads(tags[OVERRIDES_TAG])
        except json.JSONDecodeError:
            overrides = None
    return RunCurves(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        params=dict(run.data.params),
        tags=dict(tags),
        overrides=overrides,
        latest=dict(run.data.metrics),
    )


# --------------------------------------------------------------------------- compare: runs


@_server_errors
def find_runs(tracking_uri: str | None, refs: Sequence[str] = (), experiment: str | None = None,
              sweep: str | None = None, limit: int = 100) -> list[RunCurves]:
    """Runs to compare, without histories, in the order asked for.

    * each ref is a run id, or a run name (the newest run of that name wins);
    * `sweep`: the newest run of every point of that sweep (oldest first), not its parent;
    * `experiment` alone: its newest `limit` runs that are not sweep parents, oldest first;
      with refs or a sweep it only narrows where names and sweeps are looked up.
    """
    if not refs and not sweep and not experiment:
        raise UserError("nothing to compare; give run ids or names, --experiment NAME or "
                        "--sweep NAME.")
    uri = tracking_uri_or_default(tracking_uri)
    require_store(uri, f"sweep '{sweep}'" if sweep else "runs to compare")
    client = make_client(uri)
    exp_ids = _experiment_ids(client, experiment, uri)
    if not exp_ids:
        raise UserError(f"this tracking URI holds no experiments yet; train some runs first"
                        f"{missing_hint(uri)}.")
    found: list[Any] = []
    for ref in refs:
        found.append(_resolve_ref(client, exp_ids, ref, experiment, uri))
    if sweep:
        points = _search(client, exp_ids, f"tags.`{SWEEP_TAG}` = {_quote(sweep)}")
        if not points:
            where = f" in experiment '{experiment}'" if experiment else ""
            raise UserError(f"no runs of sweep '{sweep}'{where}; check the name (the sweep "
                            f"file's name:) or run `tinytale sweep` first{missing_hint(uri)}.")
        newest: dict[str, Any] = {}  # a point run again (--rerun) shows its newest run
        for run in points:
            newest[run.data.tags.get(OVERRIDES_TAG) or run.info.run_id] = run
        kept = {r.info.run_id for r in newest.values()}
        found.extend(r for r in points if r.info.run_id in kept)
    if experiment and not refs and not sweep:
        newest = _search(client, exp_ids, "", max_results=limit * 2,
                         order_by=("attributes.start_time DESC",))
        newest = [r for r in newest if SWEEP_PARENT_TAG not in r.data.tags][:limit]
        if not newest:
            raise UserError(f"MLflow experiment '{experiment}' holds no runs yet"
                            f"{missing_hint(uri)}.")
        found.extend(reversed(newest))
    unique = {r.info.run_id: r for r in found}
    return [_to_curves(r) for r in unique.values()]


def _resolve_ref(client: Any, exp_ids: Sequence[str], ref: str, experiment: str | None,
                 uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass  # maybe a run *named* like an id; try names below
    runs = _search(client, exp_ids, f"attributes.run_name = {_quote(ref)}", max_results=1,
                   order_by=("attributes.start_time DESC",))
    if not runs:
        where = f" in experiment '{experiment}'" if experiment else ""
        raise UserError(f"no run with id or name '{ref}'{where}; list runs in the MLflow UI "
                        f"or pass --experiment{missing_hint(uri)}.")
    return runs[0]


# --------------------------------------------------------------------------- compare: histories


@_server_errors
def fetch_histories(tracking_uri: str | None, runs: Sequence[RunCurves], keys: Iterable[str]
                    ) -> None:
    """Fill `run.histories[key]` for every run and key, as few round trips as possible.

    Against a tracking server it asks `metrics/get-history-bulk-interval` for up to 100 runs
    per request (one request per metric for a whole sweep); other stores (SQLite, files) and
    runs longer than 2500 epochs read `get_metric_history` per run and metric on a thread pool.
    """
    keys = list(dict.fromkeys(keys))
    uri = tracking_uri_or_default(tracking_uri)
    if not runs or not keys:
        return
    by_id = {r.run_id: r for r in runs}
    pending: list[tuple[str, str]] = []
    if uri.startswith(("http://", "https://")):
        bulk_jobs = [(key, chunk) for key in keys
                     for chunk in _chunks(list(by_id), _BULK_MAX_RUNS)]
        with ThreadPoolExecutor(max_workers=min(8, len(bulk_jobs))) as pool:
            results = list(pool.map(lambda job: _bulk_history(uri, *job), bulk_jobs))
        for (key, _chunk), result in zip(bulk_jobs, results, strict=True):
            for run_id, points in result.items():
                if len(points) >= _BULK_MAX_STEPS:
                    pending.append((run_id, key))  # may be down-sampled: read it whole
                else:
                    by_id[run_id].histories[key] = clean_series(points)
    else:
        pending = [(run_id, key) for run_id in by_id for key in keys]
    if pending:
        client = make_client(uri)

        def one(job: tuple[str, str]) -> list[tuple[int, float]]:
            return [(m.step, m.value) for m in client.get_metric_history(*job)]

        with ThreadPoolExecutor(max_workers=min(16, len(pending))) as pool:
            for (run_id, key), points in zip(pending, pool.map(one, pending), strict=True):
                by_id[run_id].histories[key] = clean_series(points)
    for run in runs:
        for key in keys:
            run.histories.setdefault(key, [])


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bulk_history(uri: str, key: str, run_ids: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    use_mlflow_settings()  # one try per request, as every client of ours makes
    endpoint = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
    response = http_request(
        get_default_host_creds(uri), endpoint, "GET",
        params={"run_ids": list(run_ids), "metric_key": key, "max_results": _BULK_MAX_STEPS},
    )
    verify_rest_response(response, endpoint)  # a 401/403 is a refusal, not a history
    out: dict[str, list[tuple[int, float]]] = {run_id: [] for run_id in run_ids}
    for m in response.json().get("metrics", []):
        out.setdefault(m["run_id"], []).append((int(m.get("step", 0)), float(m["value"])))
    return out


# --------------------------------------------------------------------------- sweeps


@_server_errors
def ensure_experiment(tracking_uri: str | None, name: str) -> str:
    """The id of experiment `name`, created when missing, as `train` creates it."""
    uri = tracking_uri_or_default(tracking_uri)
    return connection.ensure_experiment(make_client(uri), name, uri)


@_server_errors
def find_sweep_parent(tracking_uri: str | None, experiment: str | None, sweep: str
                      ) -> str | None:
    """The run id of the newest parent run of `sweep` (None when there is none)."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    try:
        exp_ids = _experiment_ids(client, experiment)
    except UserError:
        return None
    runs = _search(client, exp_ids, f"tags.`{SWEEP_PARENT_TAG}` = {_quote(sweep)}",
                   max_results=1, order_by=("attributes.start_time DESC",))
    return runs[0].info.run_id if runs else None


@_server_errors
def start_sweep_parent(tracking_uri: str | None, experiment: str, sweep: str,
                       params: dict[str, Any], spec_text: str) -> str:
    """Reopen the sweep's parent run (RUNNING again) or create it; log the sweep file to it."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    exp_id = ensure_experiment(tracking_uri, experiment)
    run_id = find_sweep_parent(tracking_uri, experiment, sweep)
    if run_id is None:
        run = client.create_run(exp_id, run_name=sweep, tags={SWEEP_PARENT_TAG: sweep})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    else:
        client.update_run(run_id, status="RUNNING")
    client.log_text(run_id, spec_text, "sweep.yaml")
    return run_id


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


@_server_errors
def finish_sweep_parent(tracking_uri: str | None, run_id: str, status: str,
                        metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    client = make_client(tracking_uri_or_default(tracking_uri))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status)


@_server_errors
def sweep_point_runs(tracking_uri: str | None, experiment: str, sweep: str) -> list[RunCurves]:
    """Every point run of `sweep` in `experiment` (any status), oldest first; none: []."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = _search(client, [exp.experiment_id], f"tags.`{SWEEP_TAG}` = {_quote(sweep)}")
    return [_to_curves(r) for r in runs]


@_server_errors
def record_failed_point(tracking_uri: str | None, experiment: str, parent_run_id: str,
                        run_name: str, tags: dict[str, str], error: str) -> str:
    """A FAILED child run for a point that died before it could open its own run."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    exp_id = ensure_experiment(tracking_uri, experiment)
    run = client.create_run(exp_id, run_name=run_name,
                            tags={**tags, PARENT_TAG: parent_run_id, ERROR_TAG: error[:4000]})
    client.log_text(run.info.run_id, error, "error.txt")
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


@_server_errors
def mark_run_failed(tracking_uri: str | None, run_id: str, error: str) -> None:
    """Close a point run its process left RUNNING (it was killed) as FAILED, with the reason."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    client.set_tag(run_id, ERROR_TAG, error[:4000])
    client.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------- figures


@_server_errors
def log_figure(tracking_uri: str | None, run_id: str, path: Path,
               artifact_dir: str = "compare") -> str:
    """Upload the comparison figure to a run; returns the artifact path."""
    client = make_client(tracking_uri_or_default(tracking_uri))
    client.log_artifact(run_id, str(path), artifact_dir)
    return f"{artifact_dir}/{Path(path).name}"
