"""`tinytale sync` and `runs`, and `generate`'s fetch of a logged checkpoint, for the CLI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tinytale.errors import UserError
from tinytale.mlflow_tracker.connection import (
    AccessRefused,
    NotSent,
    explain,
    make_client,
    require_reachable,
)
from tinytale.mlflow_tracker.reader import summary_number
from tinytale.mlflow_tracker.replay import Replayer
from tinytale.mlflow_tracker.spool import SPOOL_NAME, Spool, _public
from tinytale.mlflow_tracker.uris import (
    check_tracking_uri,
    missing_hint,
    require_store,
    resolve_tracking_uri,
)


def find_spool(target: str, out_dir: Path) -> Path:
    """A run folder, a spool file, or a run id / local id found under `out_dir`."""
    path = Path(target)
    if path.is_file() and path.name == SPOOL_NAME:
        return path
    if path.is_dir():
        if (path / SPOOL_NAME).is_file():
            return path / SPOOL_NAME
        raise UserError(f"'{path}' holds no {SPOOL_NAME}; pass a run folder written by "
                        "`tinytale train` (OUT/<run name>/<timestamp>).")
    if out_dir.is_dir():
        for spool in sorted(out_dir.rglob(SPOOL_NAME), key=os.path.getmtime, reverse=True):
            text = spool.read_text(encoding="utf-8")
            if f'"run_id":"{target}"' in text or f'"local_id":"{target}"' in text:
                return spool
    raise UserError(f"'{target}' is neither a run folder nor the id of a run spooled under "
                    f"'{out_dir}'; pass the run's folder (it holds {SPOOL_NAME}).")


def sync_spool(spool_path: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Replay what a run's spool holds that the server has not acknowledged yet."""
    spool = Spool(spool_path)
    try:
        opened = spool.first("open")
        if opened is None:
            raise UserError(f"spool '{spool_path}' has no run header; it is not a tinytale "
                            "spool.")
        uri = (tracking_uri or "").strip() or opened.get("tracking_uri") or \
            resolve_tracking_uri(None)
        check_tracking_uri(uri, write=True)
        replayer = Replayer(spool, uri)
        before = len(replayer.pending())
        try:
            done = replayer.push()
        except AccessRefused as exc:
            raise UserError(f"{exc.what}, so {len(replayer.pending())} records stay in "
                            f"{spool_path}; {exc.fix}, then run `tinytale sync` again.") \
                from None
        except NotSent as exc:
            raise UserError(f"MLflow at {uri} did not take the spooled records "
                            f"({str(exc)[:150]}); {len(replayer.pending())} records stay "
                            "spooled, run `tinytale sync` again when the server is up.") \
                from None
        result: dict[str, Any] = {
            "run_id": replayer.run_id, "tracking_uri": uri, "records_sent": before,
            "metrics_sent": replayer.pushed_metrics, "complete": done, "spool": str(spool_path),
        }
        if replayer.registered:
            result.update(_public(replayer.registered))
        return result
    finally:
        spool.close()


def list_runs(experiment: str, tracking_uri: str | None = None,
              max_results: int = 100) -> list[dict[str, Any]]:
    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri, f"the runs of experiment '{experiment}'")
    require_reachable(uri)
    client = make_client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise UserError(f"MLflow experiment '{experiment}' does not exist at {uri}; pass "
                            f"--experiment with the name you trained with"
                            f"{missing_hint(uri, False)}.")
        runs = client.search_runs([exp.experiment_id], max_results=max_results,
                                  order_by=["attributes.start_time DESC"])
    except MlflowException as exc:  # a server that refuses us (401/403): one sentence
        raise UserError(explain(exc, uri) or str(exc).splitlines()[0]) from None
    rows = []
    for run in runs:
        m, t = run.data.metrics, run.data.tags
        epochs, best_epoch = (summary_number(t, m, k) for k in ("epochs", "best_epoch"))
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "epochs": int(epochs) if epochs is not None else None,
            "best_val_loss": summary_number(t, m, "best_val_loss"),
            "best_epoch": int(best_epoch) if best_epoch is not None else None,
            "registered_model": t.get("tinytale.registered_model"),
            "registered_version": t.get("tinytale.registered_version"),
        })
    return rows


def download_checkpoint(source: str, tracking_uri: str | None = None) -> Path:
    """models:/NAME@ALIAS, models:/NAME/VERSION or a run id -> local path of its checkpoint."""
    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri, f"'{source}' (it is not a checkpoint file)")
    require_reachable(uri, f", so '{source}' cannot be fetched",
                      "start it or pass a checkpoint file")
    client = make_client(uri)
    location = _model_location_of(client, source, uri)
    dest = Path(tempfile.mkdtemp(prefix="tinytale-ckpt-"))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=str(dest),
            tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise UserError(f"cannot download the checkpoint of '{source}' from {uri} "
                        f"({str(exc).splitlines()[0][:150]}).") from None
    found = sorted(Path(local).rglob("*.pt"))
    if not found:
        raise UserError(f"'{source}' has no checkpoint file among its artifacts; it was not "
                        "logged by tinytale.")
    return found[0]


def _model_location_of(client: MlflowClient, source: str, uri: str) -> str:
    """Where the pyfunc model directory of `source` lies (an artifact URI)."""
    if source.startswith("models:/"):
        rest = source[len("models:/"):]
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif "/" in rest:
                name, version = rest.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            else:
                raise UserError(f"'{source}' names no version or alias; write "
                                "models:/NAME@ALIAS or models:/NAME/VERSION.")
        except MlflowException as exc:
            if (problem := explain(exc, uri)) is not None:  # refused or unreachable
                raise UserError(problem) from None
            raise UserError(f"model '{source}' does not exist in the registry; check the name, "
                            "alias or version (`tinytale runs` lists registered versions)"
                            f"{missing_hint(uri)}.") from None
        model_id = mv.model_id
        if not model_id and mv.source.startswith("models:/m-"):
            model_id = mv.source[len("models:/"):].strip("/")
        if model_id:
            return client.get_logged_model(model_id).artifact_location
        return mv.source
    try:
        run = client.get_run(source)
    except MlflowException as exc:
        if (problem := explain(exc, uri)) is not None:
            raise UserError(problem) from None
        raise UserError(f"'{source}' is not a checkpoint file, a models:/ URI or a known MLflow "
                        f"run id; check it, or pass --tracking-uri for another store"
                        f"{missing_hint(uri)}.") from None
    model_id = run.data.tags.get("tinytale.model_id")
    if not model_id:
        outputs = run.outputs.model_outputs if run.outputs else []
        if outputs:
            model_id = max(outputs, key=lambda o: o.step).model_id
    if not model_id:
        raise UserError(f"run '{source}' logged no model (it did not finish); pass its "
                        "best.pt checkpoint file instead.")
    return client.get_logged_model(model_id).artifact_location
