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

Modules: `uris` (tracking URIs, the health probe, UI links), `connection` (the one client,
MLflow's settings, what a failed call means), `spool` (the log, no mlflow), `replay` (the
Replayer), `pyfunc` (the model, logged and registered), `served` (the served model's code,
models-from-code), `system_metrics`, `tracker` (MlflowTracker), `commands` (sync, runs, get
for the CLI).
Callers import from this package; the names below are its public face.
"""

from __future__ import annotations

from tinytale.mlflow_tracker.commands import (
    download_checkpoint,
    find_spool,
    list_runs,
    sync_spool,
)
from tinytale.mlflow_tracker.connection import (
    EXPERIMENT_KIND,
    TRANSIENT_CODES,
    AccessRefused,
    NotSent,
    RecordRejected,
    ServerUnavailable,
    ensure_experiment,
)
from tinytale.mlflow_tracker.pyfunc import CHAMPION, MODEL_NAME, log_and_register
from tinytale.mlflow_tracker.replay import (
    MAX_BATCH_METRICS,
    MAX_BATCH_PARAMS,
    MAX_BATCH_TAGS,
    MAX_PERMANENT_FAILURES,
    Replayer,
)
from tinytale.mlflow_tracker.spool import SPOOL_NAME, Spool
from tinytale.mlflow_tracker.tracker import MlflowTracker, finish_wait_s, flush_interval_s
from tinytale.mlflow_tracker.uris import (
    EMBEDDED_ARTIFACTS,
    EMBEDDED_DB,
    KNOWN_SCHEMES,
    check_tracking_uri,
    default_tracking_uri,
    resolve_tracking_uri,
    server_healthy,
)

__all__ = [
    "CHAMPION", "EMBEDDED_ARTIFACTS", "EMBEDDED_DB", "EXPERIMENT_KIND", "KNOWN_SCHEMES",
    "MAX_BATCH_METRICS", "MAX_BATCH_PARAMS", "MAX_BATCH_TAGS", "MAX_PERMANENT_FAILURES",
    "MODEL_NAME", "SPOOL_NAME", "TRANSIENT_CODES", "AccessRefused", "MlflowTracker", "NotSent",
    "RecordRejected", "Replayer", "ServerUnavailable", "Spool", "check_tracking_uri",
    "default_tracking_uri", "download_checkpoint",
    "ensure_experiment", "find_spool", "finish_wait_s", "flush_interval_s", "list_runs",
    "log_and_register", "resolve_tracking_uri", "server_healthy", "sync_spool",
]
