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

Modules:

* `uris`: tracking URIs (defaults, validation), the health probe, links into the UI, store hints
* `connection`: the one MLflow client and its settings, what a failed call means (`NotSent`:
  `ServerUnavailable`, `AccessRefused`, `RecordRejected`), the experiment a run goes to
* `spool`: the log (no mlflow); `replay`: the Replayer
* `pyfunc`: the best checkpoint logged and registered, the champion; `served`: the served
  model's code (models-from-code)
* `tracker`: MlflowTracker; `system_metrics`: MLflow's monitor, writing to the spool
* `process`: the MlflowTracker in a helper process, for the embedded store (the training
  process never imports mlflow; `mlflow_tracker_for` picks)
* `commands`: `tinytale sync` and `runs`, and the checkpoint `generate` fetches from MLflow;
  `reader`: runs read back for sweeps and compare

Nothing here changes the environment at import, and no constructor talks to a server: MLflow's
settings are applied where a client is made or a run starts (`connection.use_mlflow_settings`),
and MlflowTracker first asks the server in `check`/`start`, before anything is written.
"""

from __future__ import annotations

import importlib
from typing import Any

# What callers outside the package use, by module; the rest is imported from its module.
# Loaded on first use (PEP 562), so that `tinytale.mlflow_tracker.uris` and `.process` can be
# imported without mlflow: the training process of an embedded store never imports it.
_EXPORTS = {"SPOOL_NAME": "spool", "MlflowTracker": "tracker",
            "download_checkpoint": "commands", "find_spool": "commands",
            "list_runs": "commands", "sync_spool": "commands"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
