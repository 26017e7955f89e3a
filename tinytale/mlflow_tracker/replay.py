"""The Replayer: brings an MLflow server up to date with a spool, in order, exactly once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tinytale.errors import UserError
from tinytale.mlflow_tracker.connection import (
    Failure,
    NotSent,
    RecordRejected,
    ServerUnavailable,
    access_refusal,
    classify,
    ensure_experiment,
    make_client,
)
from tinytale.mlflow_tracker.hf_artifact import log_hf_folder
from tinytale.mlflow_tracker.inputs_tables import log_datasets, log_samples_table
from tinytale.mlflow_tracker.pyfunc import log_and_register
from tinytale.mlflow_tracker.spool import Spool
from tinytale.mlflow_tracker.uris import server_healthy

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limits
MAX_BATCH_PARAMS = 100
MAX_BATCH_TAGS = 100
MAX_PERMANENT_FAILURES = 3  # a record the server rejects as invalid is skipped after this

log = logging.getLogger("tinytale.mlflow")


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
        self.suspects: set[int] = set()  # metric records of a rejected batch: send one by one
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
            raise ServerUnavailable(f"MLflow server {self.uri} is unreachable")
        if self.client is None:
            self.client = make_client(self.uri)
        return self.client

    # -- the loop --------------------------------------------------------------

    def push(self, include_models: bool = True) -> bool:
        """Send everything pending; True when the spool is fully acknowledged.

        Raises NotSent when the server did not take a record (nothing is lost: call again
        later): ServerUnavailable, AccessRefused or RecordRejected.
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
                    most = 1 if rec["seq"] in self.suspects else len(pending)
                    while j < len(pending) and j - i < most and pending[j]["op"] == "m" and \
                            count + len(pending[j]["metrics"]) <= MAX_BATCH_METRICS:
                        count += len(pending[j]["metrics"])
                        j += 1
                    j = max(j, i + 1)
                    self._guarded(pending[i:j], self._send_metrics, client, pending[i:j])
                    i = j
                    continue
                self._guarded([rec], self._apply, client, rec)
                i += 1
            return not self.pending()

    def _guarded(self, recs: list[dict[str, Any]], action: Any, *args: Any) -> None:
        """Run one send of `recs`; ack them on success, classify a failure.

        Only an acknowledged record counts as sent. A failure is an outage or a busy server
        (ServerUnavailable), a refusal of our login, permission or Host header
        (AccessRefused), or a definite answer about the records (RecordRejected); of those
        only a record the server calls invalid is ever skipped.
        """
        last = recs[-1]
        try:
            action(*args)
        except NotSent:
            self._doubt()
            raise
        except UserError:
            raise  # e.g. a deleted experiment: the user must act
        except Exception as exc:
            self._doubt()  # the server may have taken part of it
            self._failed(recs, exc)
            return
        self._ack(last["seq"])

    def _failed(self, recs: list[dict[str, Any]], exc: Exception) -> None:
        """Raise the NotSent that `exc` means for `recs`, or skip (acknowledge unsent) a
        record the server called invalid MAX_PERMANENT_FAILURES times."""
        last = recs[-1]
        seq = last["seq"]
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        failure = classify(exc, self.uri)
        if failure is Failure.REFUSED:
            raise access_refusal(exc, self.uri) from exc
        if failure in (Failure.UNREACHABLE, Failure.BUSY):
            raise ServerUnavailable(why[:300]) from exc
        log.debug("spool record %s failed", seq, exc_info=True)
        # Never the run's `open`, which every later record needs.
        if failure is not Failure.INVALID or last["op"] == "open":
            raise RecordRejected(f"MLflow did not take spool record {seq} ({last['op']}): "
                                 f"{why[:200]}; it stays spooled") from exc
        if len(recs) > 1:  # one bad metric must not take a whole batch down with it
            self.suspects.update(r["seq"] for r in recs)
            raise RecordRejected(f"MLflow rejected a batch of metrics ({why[:200]}); "
                                 "resending it record by record") from exc
        # The record itself is invalid: retry a few times, then skip it.
        self.failures[seq] = self.failures.get(seq, 0) + 1
        if self.failures[seq] < MAX_PERMANENT_FAILURES:
            raise RecordRejected(f"MLflow rejected spool record {seq} ({last['op']}): "
                                 f"{why[:200]}; will retry") from exc
        log.warning("MLflow rejected spool record %s (%s) as invalid: %s; skipping it",
                    seq, last["op"], why[:300])
        self._ack(seq)

    # -- operations ----------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:  # kept, never dropped: a later replay creates the run first
            raise NotSent("the spool has no run on the server yet (its open record was not "
                          "accepted)")
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
        elif op == "inputs":
            log_datasets(client, self._require_run(), rec["datasets"])
        elif op == "samples":
            log_samples_table(client, self._require_run(), rec["rows"])
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
        if rec.get("export_hf"):
            log_hf_folder(client, self._require_run(), Path(rec["checkpoint"]))
        return log_and_register(client, self.uri, self._require_run(), self.experiment_id,
                                rec, self.spool)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]

