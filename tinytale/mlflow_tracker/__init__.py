"""MLflow tracking for tinytale: this package is the only place that imports mlflow.

`tinytale.mlflow_tracker` writes runs (the tracker, the spool, the registry) and
`tinytale.mlflow_tracker.reader` reads them back for sweeps and `tinytale compare`.

Design
------
The training loop calls the tracker synchronously, and one metric call to an MLflow
server costs more than a training step of the lesson model, so nothing here talks to the
server on the loop's thread. Every tracker call appends one JSON line to a *spool*
(`<run dir>/mlflow_spool.jsonl`, append-only) and returns. A background thread (the
`Replayer`) sends what is not yet on the server in batches (`MlflowClient.log_batch`) every
few seconds and appends an `ack` line for what the server accepted.

If the server is unreachable (at start or mid-run), training goes on; the spool keeps
growing and is replayed in order when the server answers again, or later by
`tinytale sync RUN_DIR`. A run that could not be created at start is created when the
server comes back, keyed by the spool's local id (tag `tinytale.local_id`), so a replay
never creates it twice. Metrics are deduplicated by (key, step) against what the spool
says was acknowledged and, after a failed or unknown send, against the server's metric
history, so none is lost and none is logged twice. The best model is logged and
registered from the same queue, once the server is back (`finish` waits a bounded time).

Spool records (one JSON object per line): data records carry a `seq` number and an `op`:
`open` (experiment, run name, tags, local id, parent/resume ids), `reopen` (a resumed
run), `params`, `tags`, `text` (small artifact, inline), `m` (metrics at one step),
`model` (log + register the best checkpoint), `end` (terminal status). Bookkeeping lines
written by the replayer have no seq: `run` (the server's run id), `ack` (every record up
to seq N is on the server) and `registered` (the model version created).
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from tinytale.errors import UserError
from tinytale.tracking import RunInfo, Tracker

SPOOL_NAME = "mlflow_spool.jsonl"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
CHAMPION = "champion"
MODEL_NAME = "model"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limits
MAX_BATCH_PARAMS = 100
MAX_BATCH_TAGS = 100
MAX_PERMANENT_FAILURES = 3  # a record the server definitely refuses is skipped after this
KNOWN_SCHEMES = {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                 "databricks", "databricks-uc", "uc"}

log = logging.getLogger("tinytale.mlflow")

# One HTTP try per call: the replayer is the retry layer, and MLflow's own retries with
# backoff would block a flush for minutes while the server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# stdout carries the CLI's --json line: MLflow must not print run URLs or progress bars there.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def flush_interval_s() -> float:
    """Seconds between background sends (TINYTALE_TRACKING_FLUSH_S, default 5)."""
    return float(os.environ.get("TINYTALE_TRACKING_FLUSH_S", "5"))


def finish_wait_s() -> float:
    """How long finish() waits for an unreachable server (TINYTALE_TRACKING_WAIT_S, 30)."""
    return float(os.environ.get("TINYTALE_TRACKING_WAIT_S", "30"))


class Unreachable(Exception):
    """The tracking server did not answer; the spool keeps everything for later."""


# --------------------------------------------------------------------------- URIs


def default_tracking_uri(cwd: Path | None = None) -> str:
    """The embedded store: SQLite in the working directory (absolute, so a spool replays)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / EMBEDDED_DB}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """--tracking-uri / MLFLOW_TRACKING_URI as given, else the embedded SQLite store."""
    uri = (tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return default_tracking_uri()
    check_tracking_uri(uri)
    return uri


def check_tracking_uri(uri: str) -> None:
    """Reject URIs MLflow cannot use, with one sentence, before any training starts."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if not scheme or (len(scheme) == 1 and sys.platform == "win32"):
        return  # a plain local path: MLflow's file store
    hint = ("use http://HOST:PORT for a server, sqlite:///PATH.db for a local store, or leave "
            "it unset for ./mlflow.db")
    if scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise UserError(f"tracking URI '{uri}' has an unsupported scheme '{scheme}'; {hint}.")
    if scheme in ("http", "https"):
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if not parsed.hostname or port == -1:
            raise UserError(f"tracking URI '{uri}' is not a valid server address; {hint}.")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise UserError(f"tracking URI '{uri}' is not a valid SQLite URI; {hint}.")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def server_healthy(uri: str, timeout: float = 2.0) -> bool:
    """A cheap probe (no MLflow retries): True for local stores, /health for servers."""
    if not _is_http(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                   "DEADLINE_EXCEEDED"}


def _transient(exc: BaseException, uri: str) -> bool:
    """Retry later without counting (server away or busy), or a refusal to give up on?

    Only a definite answer (bad value, unknown resource, a bug of ours) counts as a refusal:
    anything that may pass on its own is retried, and stays in the spool meanwhile.
    """
    if isinstance(exc, OSError | TimeoutError) or not server_healthy(uri):
        return True  # requests' errors are OSErrors
    if str(getattr(exc, "error_code", "")) in TRANSIENT_CODES:
        return True
    text = str(exc).lower()
    return "database is locked" in text or "busy" in text


def _client(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)  # log_model and register_model use the global URI
    return MlflowClient(uri, registry_uri=uri)


# --------------------------------------------------------------------------- spool


class Spool:
    """Append-only JSONL file plus its records in memory; safe to append from two threads."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.next_seq = 1
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:  # one writer at a time: a training process, or `tinytale sync`
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks, trust the user
            pass
        except OSError:
            self._file.close()
            raise UserError(f"'{path}' is in use by another tinytale process (a training "
                            "still running?); wait for it to end, then sync.") from None
        self._file.seek(0)
        text = self._file.read()
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            self.records.append(rec)
            if "seq" in rec:
                self.next_seq = max(self.next_seq, rec["seq"] + 1)
        if text and not text.endswith("\n"):
            self._file.write("\n")  # end the cut line, so the next record stands alone

    def append(self, rec: dict[str, Any], data: bool = True) -> dict[str, Any]:
        with self._lock:
            if data:
                rec = {"seq": self.next_seq, **rec}
                self.next_seq += 1
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._file.flush()
            self.records.append(rec)
        return rec

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                with contextlib.suppress(OSError):
                    os.fsync(self._file.fileno())
                self._file.close()

    def first(self, op: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("op") == op), None)


# --------------------------------------------------------------------------- replayer


class Replayer:
    """Brings the server up to date with a spool, in order; callable again after a failure."""

    def __init__(self, spool: Spool, uri: str):
        self.spool = spool
        self.uri = uri
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.acked = 0
        self.registered: dict[str, Any] | None = None
        self.sent: set[tuple[str, int]] = set()
        self.checked_keys: set[str] = set()
        self.failures: dict[int, int] = {}
        self.lock = threading.RLock()
        self.pushed_metrics = 0
        by_seq: dict[int, dict[str, Any]] = {}
        for rec in spool.records:
            op = rec.get("op")
            if "seq" in rec:
                by_seq[rec["seq"]] = rec
            elif rec.get("uri", uri) != uri:
                continue  # bookkeeping of a replay to another tracking server
            elif op == "run":
                self.run_id, self.experiment_id = rec["run_id"], rec.get("experiment_id")
            elif op == "ack":
                self.acked = max(self.acked, rec["upto"])
            elif op == "registered":
                self.registered = rec
        for seq, rec in by_seq.items():
            if seq <= self.acked and rec.get("op") == "m":
                self.sent.update((k, rec["step"]) for k in rec["metrics"])
        # Records left unacknowledged by an earlier process may have reached the server
        # without their ack being written: check the server's history before resending.
        self.uncertain = any(s > self.acked for s in by_seq)

    # -- state ---------------------------------------------------------------

    def _doubt(self) -> None:
        """The server may hold more than the acks say: check histories before sending."""
        self.uncertain = True
        self.checked_keys.clear()

    def pending(self) -> list[dict[str, Any]]:
        return [r for r in self.spool.records if r.get("seq", 0) > self.acked]

    def _ack(self, seq: int) -> None:
        self.spool.append({"op": "ack", "upto": seq, "uri": self.uri}, data=False)
        self.acked = max(self.acked, seq)

    def _connect(self) -> MlflowClient:
        if not server_healthy(self.uri):
            raise Unreachable(f"MLflow server {self.uri} is unreachable")
        if self.client is None:
            self.client = _client(self.uri)
        return self.client

    # -- the loop --------------------------------------------------------------

    def push(self, include_models: bool = True) -> bool:
        """Send everything pending; True when the spool is fully acknowledged.

        Raises Unreachable when the server is away (nothing is lost: call again later).
        """
        with self.lock:
            pending = self.pending()
            if not pending:
                return True
            client = self._connect()
            i = 0
            while i < len(pending):
                rec = pending[i]
                if rec["op"] == "model" and not include_models:
                    return False
                if rec["op"] == "m":
                    j = i
                    count = 0
                    while j < len(pending) and pending[j]["op"] == "m" and \
                            count + len(pending[j]["metrics"]) <= MAX_BATCH_METRICS:
                        count += len(pending[j]["metrics"])
                        j += 1
                    j = max(j, i + 1)
                    self._guarded(pending[j - 1], self._send_metrics, client, pending[i:j])
                    i = j
                    continue
                self._guarded(rec, self._apply, client, rec)
                i += 1
            return not self.pending()

    def _guarded(self, last: dict[str, Any], action: Any, *args: Any) -> None:
        """Run one send; ack `last` on success, classify a failure (away / refused)."""
        try:
            action(*args)
        except Unreachable:
            self._doubt()
            raise
        except UserError:
            raise  # e.g. a deleted experiment: the user must act
        except Exception as exc:
            self._doubt()  # the server may have taken part of it
            if _transient(exc, self.uri):
                raise Unreachable(str(exc).splitlines()[0][:300]) from exc
            # The server answers but refused: retry a few times, then skip the record.
            seq = last["seq"]
            self.failures[seq] = self.failures.get(seq, 0) + 1
            log.debug("spool record %s failed", seq, exc_info=True)
            if self.failures[seq] < MAX_PERMANENT_FAILURES:
                raise Unreachable(f"MLflow refused spool record {seq} ({last['op']}): "
                                  f"{str(exc).splitlines()[0][:200]}; will retry") from exc
            log.warning("MLflow rejected spool record %s (%s): %s; skipping it", seq,
                        last["op"], str(exc).splitlines()[0][:300])
            self._ack(seq)
            return
        self._ack(last["seq"])

    # -- operations ----------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise MlflowException("spool has no run to log to (its open record was refused)",
                                  error_code=INVALID_STATE)
        return self.run_id

    def _apply(self, client: MlflowClient, rec: dict[str, Any]) -> None:
        op = rec["op"]
        if op == "open":
            self._open(client, rec)
        elif op == "reopen":
            client.update_run(self._require_run(), status="RUNNING")
        elif op == "params":
            items = [Param(k, _param_value(v)) for k, v in rec["params"].items()]
            for chunk in _chunks(items, MAX_BATCH_PARAMS):
                client.log_batch(self._require_run(), params=chunk, synchronous=True)
        elif op == "tags":
            items = [RunTag(k, str(v)[:5000]) for k, v in rec["tags"].items()]
            for chunk in _chunks(items, MAX_BATCH_TAGS):
                client.log_batch(self._require_run(), tags=chunk, synchronous=True)
        elif op == "text":
            client.log_text(self._require_run(), rec["text"], rec["name"])
        elif op == "model":
            self.registered = self._log_model(client, rec)
        elif op == "end":
            client.set_terminated(self._require_run(), rec["status"], end_time=rec["ts"])
        else:
            log.warning("unknown spool record %r; skipping it", op)

    def _open(self, client: MlflowClient, rec: dict[str, Any]) -> None:
        if self.run_id is not None:
            return
        if rec.get("resume_run_id"):
            try:
                run = client.get_run(rec["resume_run_id"])
            except MlflowException as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                    raise
                log.warning("run %s to resume is not in %s; logging to a new run",
                            rec["resume_run_id"], self.uri)
            else:
                self._set_run(run.info.run_id, run.info.experiment_id)
                self._doubt()  # it may hold metrics this spool never saw
                client.update_run(self.run_id, status="RUNNING")
                return
        exp_id = ensure_experiment(client, rec["experiment"], self.uri)
        local_id = rec["local_id"]
        found = client.search_runs([exp_id], f"tags.`tinytale.local_id` = '{local_id}'",
                                   max_results=1)
        if found:
            self._set_run(found[0].info.run_id, exp_id)
            self._doubt()
            return
        tags = {**rec["tags"], "tinytale.local_id": local_id, "mlflow.runName": rec["run_name"]}
        if rec.get("parent_run_id"):
            tags["mlflow.parentRunId"] = rec["parent_run_id"]
        run = client.create_run(exp_id, start_time=rec["ts"], tags=tags,
                                run_name=rec["run_name"])
        self._set_run(run.info.run_id, exp_id)

    def _set_run(self, run_id: str, experiment_id: str) -> None:
        self.run_id, self.experiment_id = run_id, experiment_id
        self.spool.append({"op": "run", "run_id": run_id, "experiment_id": experiment_id,
                           "uri": self.uri}, data=False)

    def _send_metrics(self, client: MlflowClient, recs: list[dict[str, Any]]) -> None:
        run_id = self._require_run()
        if self.uncertain:
            # One history read per key and episode of doubt: what the server already holds.
            keys = {k for r in recs for k in r["metrics"]} - self.checked_keys
            for key in sorted(keys):
                self.sent.update((key, m.step) for m in client.get_metric_history(run_id, key))
                self.checked_keys.add(key)
        batch: list[Metric] = []
        seen: set[tuple[str, int]] = set()
        for r in recs:
            for key, value in r["metrics"].items():
                ks = (key, r["step"])
                if ks in self.sent or ks in seen:
                    continue  # logged before (a resumed epoch, a replay): keep the first
                seen.add(ks)
                batch.append(Metric(key, float(value), r["ts"], r["step"]))
        if batch:
            client.log_batch(run_id, metrics=batch, synchronous=True)
        self.sent.update(seen)
        self.pushed_metrics += len(batch)

    def _log_model(self, client: MlflowClient, rec: dict[str, Any]) -> dict[str, Any]:
        return log_and_register(client, self.uri, self._require_run(), self.experiment_id,
                                rec, self.spool)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id; created (tagged for the training-runs view) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment '{name}' is deleted; restore it with `mlflow "
                            f"experiments restore` or train with another --experiment.")
        return exp.experiment_id
    location = None
    if _is_embedded(uri):
        db = Path(uri[len("sqlite:///"):])
        location = (db.parent / EMBEDDED_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" in str(exc.error_code):  # created by a parallel run
            return client.get_experiment_by_name(name).experiment_id
        raise


# --------------------------------------------------------------------------- the model

PYFUNC_CODE = '''\
"""tinytale GPT as an MLflow pyfunc model (models-from-code; written by tinytale)."""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": -1}


def _prompts(model_input):
    """A list of prompts from a list, a string, a Series, an array or a DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame: the prompt column, else the first one
        column = "prompt" if "prompt" in columns else columns[0]
        return ["" if v is None else str(v) for v in model_input[column].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    prompts = []
    for item in model_input:
        if isinstance(item, dict):
            item = item.get("prompt", "")
        elif isinstance(item, (list, tuple)):
            item = item[0] if item else ""
        prompts.append("" if item is None else str(item))
    return prompts


class TinytaleModel(PythonModel):
    def load_context(self, context):
        from tinytale.run import load_model

        self.model, self.tokenizer, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from tinytale.run import complete

        p = {**DEFAULTS, **(params or {})}
        seed = int(p["seed"])
        out = []
        for i, prompt in enumerate(_prompts(model_input)):
            out.extend(complete(
                self.model, self.tokenizer, prompt, int(p["max_new_tokens"]),
                float(p["temperature"]), int(p["top_k"]), float(p["top_p"]),
                seed=None if seed < 0 else seed + i,
            ))
        return out


mlflow.models.set_model(TinytaleModel())
'''


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        # One unnamed string column: a list of prompts and a DataFrame with a `prompt`
        # column both pass MLflow's schema enforcement.
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 100),
            ParamSpec("temperature", "double", 0.8),
            ParamSpec("top_k", "long", 0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", -1),
        ]),
    )


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "numpy", "pyyaml", "tokenizers", "pandas"):
        try:
            version = importlib.metadata.version(dist).split("+")[0]
            reqs.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _package_copy(dest: Path) -> Path:
    """The tinytale sources (no caches) to ship with the model as code_paths."""
    import tinytale

    src = Path(tinytale.__file__).parent
    target = dest / "tinytale"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_and_register(client: MlflowClient, uri: str, run_id: str, experiment_id: str | None,
                     rec: dict[str, Any], spool: Spool | None = None) -> dict[str, Any]:
    """Log the best checkpoint as a pyfunc model; register it and move `champion` if better.

    Idempotent per spool record: a replay finds the version a lost ack already created.
    """
    from mlflow.models import Model

    summary = rec.get("summary", {})
    name = rec["registered_model"]
    key = f"{rec['local_id']}:{rec['seq']}"
    checkpoint = Path(rec["checkpoint"])
    best_val_loss = summary.get("best_val_loss")
    best_epoch = summary.get("best_epoch")
    result: dict[str, Any] = {"registered_model": name if rec["register"] else None}

    model_uri = model_id = None
    if experiment_id:
        found = client.search_logged_models(
            [experiment_id], filter_string=f"tags.tinytale_spool_key = '{key}'", max_results=1)
        if found:
            model_id = found[0].model_id
            model_uri = f"models:/{model_id}"
    if model_uri is None:
        if not checkpoint.is_file():
            raise MlflowException(f"checkpoint {checkpoint} is gone; cannot log the model",
                                  error_code=INVALID_STATE)
        mlflow.set_tracking_uri(uri)
        with tempfile.TemporaryDirectory(prefix="tinytale-model-") as tmp:
            code_file = Path(tmp) / "tinytale_pyfunc.py"
            code_file.write_text(PYFUNC_CODE, encoding="utf-8")
            package = _package_copy(Path(tmp))
            with warnings.catch_warnings():  # "no input example": on purpose, it costs a load
                warnings.simplefilter("ignore")
                info = Model.log(
                    artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                    python_model=str(code_file), artifacts={"checkpoint": str(checkpoint)},
                    code_paths=[str(package)], pip_requirements=_requirements(),
                    signature=_signature(), step=int(best_epoch or 0),
                    tags={"tinytale_spool_key": key, "best_epoch": str(best_epoch),
                          "best_val_loss": str(best_val_loss)},
                    model_type="tinytale-gpt",
                )
        model_uri, model_id = info.model_uri, info.model_id
    client.set_tag(run_id, "tinytale.model_id", model_id)
    result.update(model_uri=model_uri, model_id=model_id)
    if not rec["register"]:
        return _record_registration(spool, result, uri)

    version = None
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.name == name and mv.tags.get("tinytale_spool_key") == key:
            version = mv
            break
    if version is None:
        tags = {"run_id": run_id, "best_epoch": str(best_epoch),
                "best_val_loss": str(best_val_loss), "tinytale_spool_key": key}
        for k in ("config_hash", "experiment"):
            if summary.get(k):
                tags[k] = str(summary[k])
        with contextlib.suppress(MlflowException):
            client.create_registered_model(
                name, description="tinytale GPT trained on fairy tales; alias 'champion' is "
                                  "the version with the lowest validation loss.")
        version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                              tags=tags, model_id=model_id)
    result.update(registered_version=str(version.version), champion=False)
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
        champ_loss = _float(champ.tags.get("best_val_loss"))
        champion_version = str(champ.version)
    except MlflowException:
        champ_loss, champion_version = math.inf, None
    loss = _float(best_val_loss)
    if champion_version == str(version.version) or champion_version is None or loss < champ_loss:
        client.set_registered_model_alias(name, CHAMPION, str(version.version))
        result["champion"] = True
    client.set_tag(run_id, "tinytale.registered_version", str(version.version))
    client.set_tag(run_id, "tinytale.registered_model", name)
    return _record_registration(spool, result, uri)


def _record_registration(spool: Spool | None, result: dict[str, Any],
                         uri: str) -> dict[str, Any]:
    if spool is not None:
        spool.append({"op": "registered", **result, "uri": uri}, data=False)
    return result


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    """A spool bookkeeping record without its bookkeeping fields."""
    return {k: v for k, v in rec.items() if k not in ("op", "uri")}


def _float(x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


# --------------------------------------------------------------------------- system metrics


def _system_monitor(sink: Any, interval: float, first_step: int, uri: str) -> Any:
    """MLflow's SystemMetricsMonitor, publishing into our spool instead of straight to MLflow."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class SpoolingSystemMetricsMonitor(SystemMetricsMonitor):
        def __init__(self) -> None:
            super().__init__(run_id=None, sampling_interval=interval, samples_before_logging=1,
                             tracking_uri=uri)
            self._logging_step = first_step
            self._unpublished = False

        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                with contextlib.suppress(Exception):
                    self.collect_metrics()
                    self._unpublished = True
                if self._shutdown_event.wait(self.sampling_interval):
                    break
                self._publish()

        def _publish(self) -> None:
            if self._unpublished:
                with contextlib.suppress(Exception):
                    self.publish_metrics(self.aggregate_metrics())
                self._unpublished = False

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
            sink({prefix + k: v for k, v in metrics.items()}, self._logging_step)
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join(timeout=10)
            self._process = None
            self._publish()

    return SpoolingSystemMetricsMonitor()


# --------------------------------------------------------------------------- the tracker


class MlflowTracker(Tracker):
    """Tracker that spools locally and replays to MLflow on a background thread."""

    def __init__(self, config: Any, tracking_uri: str | None = None):
        self.config = config
        self.uri = resolve_tracking_uri(tracking_uri)
        self.spool: Spool | None = None
        self.replayer: Replayer | None = None
        self.local_id: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._monitor: Any = None
        self._best: tuple[float, int] = (math.inf, 0)
        self._last_epoch = 0
        self._warned = False
        self._nonfinite = 0
        self._tmpdir: str | None = None

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        # Live: a run created after an outage gets its id from the replayer later on, and
        # checkpoints written after that carry it (so `--resume RUN_ID` finds them).
        return self.replayer.run_id if self.replayer else None

    # -- lifecycle ---------------------------------------------------------------

    def start(self, info: RunInfo) -> str | None:
        local_dir = info.local_dir
        if local_dir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="tinytale-spool-")
            local_dir = Path(self._tmpdir)
        self.spool = Spool(Path(local_dir) / SPOOL_NAME)
        self.replayer = Replayer(self.spool, self.uri)
        opened = self.spool.first("open")
        now = _now_ms()
        if opened is None:
            self.local_id = uuid.uuid4().hex
            tags = {**info.tags, "mlflow.user": _user(), "mlflow.source.name": "tinytale",
                    "mlflow.source.type": "LOCAL"}
            if info.tags.get("git_commit"):
                tags["mlflow.source.git.commit"] = info.tags["git_commit"]
            self.spool.append({
                "op": "open", "ts": now, "experiment": info.experiment,
                "run_name": info.run_name, "tags": tags, "local_id": self.local_id,
                "parent_run_id": info.parent_run_id, "resume_run_id": info.resume_run_id,
                "tracking_uri": self.uri,
            })
            self.spool.append({"op": "params", "params": info.params})
            if info.config_yaml:
                self.spool.append({"op": "text", "name": "config.yaml",
                                   "text": info.config_yaml})
        else:
            self.local_id = opened["local_id"]
            self.spool.append({"op": "reopen", "ts": now})
            self._restore_progress()
        try:
            self.replayer.push()
        except Unreachable as exc:
            self._warn_offline(str(exc))
        except UserError:
            raise
        if self.config.tracking.system_metrics:
            try:
                self._monitor = _system_monitor(
                    self._log_system, float(os.environ.get(
                        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")),
                    self._next_system_step(), self.uri)
                self._monitor.start()
            except Exception as exc:  # psutil missing, odd platform: not worth failing for
                log.warning("system metrics are off: %s", exc)
                self._monitor = None
        self._thread = threading.Thread(target=self._background, name="tinytale-mlflow",
                                        daemon=True)
        self._thread.start()
        return self.run_id

    def _restore_progress(self) -> None:
        """Best val loss and last epoch so far, from the metrics an earlier process spooled."""
        for rec in self.spool.records:
            if rec.get("op") == "m" and "val_loss" in rec["metrics"]:
                self._note_epoch(rec["metrics"], rec["step"])

    def _next_system_step(self) -> int:
        steps = [r["step"] for r in self.spool.records
                 if r.get("op") == "m" and any(k.startswith("system/") for k in r["metrics"])]
        return max(steps) + 1 if steps else 0

    def _background(self) -> None:
        interval = flush_interval_s()
        delay = interval
        while not self._stop.wait(delay):
            try:
                self.replayer.push(include_models=False)
                delay = interval
            except Unreachable as exc:
                self._warn_offline(str(exc))
                delay = min(interval, 2.0)
            except Exception as exc:  # never let the logger thread die silently
                log.warning("MLflow logging error: %s", exc)
                delay = interval

    def _warn_offline(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: cannot log to MLflow at {self.uri} ({why[:200]}); training "
                  f"goes on and everything is kept in {self.spool.path}, to be sent when the "
                  "server is back (or by `tinytale sync`).", file=sys.stderr, flush=True)

    # -- the loop's calls: append only ------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.spool.append({"op": "m", "step": int(step), "ts": _now_ms(),
                           "metrics": {k: float(v) for k, v in metrics.items()}})
        if "val_loss" in metrics:
            self._note_epoch(metrics, step)

    def _note_epoch(self, metrics: dict[str, float], step: int) -> None:
        self._last_epoch = max(self._last_epoch, int(step))
        val = float(metrics["val_loss"])
        if math.isfinite(val) and val < self._best[0]:
            self._best = (val, int(step))

    def _log_system(self, metrics: dict[str, float], step: int) -> None:
        if self.spool is not None:
            self.spool.append({"op": "m", "step": int(step), "ts": _now_ms(),
                               "metrics": {k: float(v) for k, v in metrics.items()}})

    def on_event(self, name: str, detail: dict[str, Any]) -> None:
        tags = {f"tinytale.event.{name}": json.dumps(detail, default=str)}
        if name == "nonfinite":
            self._nonfinite += 1
            tags["tinytale.nonfinite_steps"] = str(self._nonfinite)
        self.spool.append({"op": "tags", "tags": tags})

    def log_text(self, name: str, text: str) -> None:
        self.spool.append({"op": "text", "name": name, "text": text})

    # -- the end -----------------------------------------------------------------------------

    def log_best_model(self, checkpoint: Path, summary: dict[str, Any]) -> dict[str, Any]:
        tracking = self.config.tracking
        safe_summary = {k: v for k, v in summary.items()
                        if isinstance(v, str | int | float | bool | type(None))}
        safe_summary["config_hash"] = self.config.hash()
        safe_summary["experiment"] = tracking.experiment
        if summary.get("best_val_loss") is not None:
            self._best = (float(summary["best_val_loss"]), int(summary["best_epoch"] or 0))
        rec = self.spool.append({
            "op": "model", "checkpoint": str(Path(checkpoint).resolve()),
            "summary": safe_summary, "register": bool(tracking.register),
            "registered_model": tracking.registered_model, "local_id": self.local_id,
        })
        t0 = time.perf_counter()
        try:
            self.replayer.push()
        except Unreachable as exc:
            self._warn_offline(str(exc))
        out: dict[str, Any] = {"tracking_uri": self.uri}
        if self.replayer.run_id:
            out["run_id"] = self.replayer.run_id
        if self.replayer.acked >= rec["seq"] and self.replayer.registered:
            out.update(_public(self.replayer.registered))
            out["registration_time_s"] = round(time.perf_counter() - t0, 3)
        else:
            out.update(registered_model=tracking.registered_model if tracking.register
                       else None, registered_version=None, registration="pending",
                       spool=str(self.spool.path))
        return out

    def finish(self, status: str) -> None:
        if self.spool is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
        best, best_epoch = self._best
        final = {"epochs": float(self._last_epoch)}
        if math.isfinite(best):
            final.update(best_val_loss=best, best_epoch=float(best_epoch))
        self.spool.append({"op": "m", "step": self._last_epoch, "ts": _now_ms(),
                           "metrics": final})
        self.spool.append({"op": "tags", "tags": {"tinytale.epochs": str(self._last_epoch)}})
        self.spool.append({"op": "end", "status": status, "ts": _now_ms()})
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + finish_wait_s()
        while True:
            try:
                if self.replayer.push():
                    break
            except Unreachable as exc:
                self._warn_offline(str(exc))
            except Exception as exc:  # the run is over: keep the spool, never crash here
                print(f"warning: MLflow logging failed ({str(exc)[:300]}); the spool "
                      f"{self.spool.path} keeps everything for `tinytale sync`.",
                      file=sys.stderr, flush=True)
                break
            if time.monotonic() >= deadline:
                print(f"warning: MLflow at {self.uri} is still unreachable; "
                      f"{len(self.replayer.pending())} spooled records wait in "
                      f"{self.spool.path}; send them with `tinytale sync "
                      f"{self.spool.path.parent}`.", file=sys.stderr, flush=True)
                break
            time.sleep(1.0)
        self.spool.close()
        if self._tmpdir and not self.replayer.pending():
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


# --------------------------------------------------------------------------- sync / runs / get


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
        check_tracking_uri(uri)
        replayer = Replayer(spool, uri)
        before = len(replayer.pending())
        try:
            done = replayer.push()
        except Unreachable as exc:
            raise UserError(f"MLflow at {uri} is unreachable ({str(exc)[:150]}); "
                            f"{len(replayer.pending())} records stay spooled, run `tinytale "
                            "sync` again when the server is up.") from None
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
    if _is_embedded(uri) and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"no MLflow store at {uri}; run `tinytale train` here first or pass "
                        "--tracking-uri.")
    if not server_healthy(uri):
        raise UserError(f"MLflow server {uri} is unreachable; start it or pass another "
                        "--tracking-uri.")
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"MLflow experiment '{experiment}' does not exist at {uri}; pass "
                        "--experiment with the name you trained with.")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=max_results,
                                  order_by=["attributes.start_time DESC"]):
        m, t = run.data.metrics, run.data.tags
        epochs = t.get("tinytale.epochs") or m.get("epochs")
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "epochs": int(float(epochs)) if epochs is not None else None,
            "best_val_loss": m.get("best_val_loss"),
            "best_epoch": int(m["best_epoch"]) if "best_epoch" in m else None,
            "registered_model": t.get("tinytale.registered_model"),
            "registered_version": t.get("tinytale.registered_version"),
        })
    return rows


def download_checkpoint(source: str, tracking_uri: str | None = None) -> Path:
    """models:/NAME@ALIAS, models:/NAME/VERSION or a run id -> local path of its checkpoint."""
    uri = resolve_tracking_uri(tracking_uri)
    if _is_embedded(uri) and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"'{source}' is not a checkpoint file, and there is no MLflow store "
                        f"at {uri} to look it up in; pass a .pt path or --tracking-uri.")
    if not server_healthy(uri):
        raise UserError(f"MLflow server {uri} is unreachable, so '{source}' cannot be "
                        "fetched; start it or pass a checkpoint file.")
    client = _client(uri)
    location = _model_location_of(client, source)
    dest = Path(tempfile.mkdtemp(prefix="tinytale-ckpt-"))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=str(dest))
    except MlflowException as exc:
        raise UserError(f"cannot download the checkpoint of '{source}' from {uri} "
                        f"({str(exc).splitlines()[0][:150]}).") from None
    found = sorted(Path(local).rglob("*.pt"))
    if not found:
        raise UserError(f"'{source}' has no checkpoint file among its artifacts; it was not "
                        "logged by tinytale.")
    return found[0]


def _model_location_of(client: MlflowClient, source: str) -> str:
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
        except MlflowException:
            raise UserError(f"model '{source}' does not exist in the registry; check the name, "
                            "alias or version (`tinytale runs` lists registered versions).") \
                from None
        model_id = mv.model_id
        if not model_id and mv.source.startswith("models:/m-"):
            model_id = mv.source[len("models:/"):].strip("/")
        if model_id:
            return client.get_logged_model(model_id).artifact_location
        return mv.source
    try:
        run = client.get_run(source)
    except MlflowException:
        raise UserError(f"'{source}' is not a checkpoint file, a models:/ URI or a known MLflow "
                        "run id; check it, or pass --tracking-uri for another store.") from None
    model_id = run.data.tags.get("tinytale.model_id")
    if not model_id:
        outputs = run.outputs.model_outputs if run.outputs else []
        if outputs:
            model_id = max(outputs, key=lambda o: o.step).model_id
    if not model_id:
        raise UserError(f"run '{source}' logged no model (it did not finish); pass its "
                        "best.pt checkpoint file instead.")
    return client.get_logged_model(model_id).artifact_location
