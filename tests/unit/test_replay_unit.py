"""The Replayer's bookkeeping, fast: batches, dedup by (key, step), resending after a send
whose answer was lost, skipping only an invalid record; and what a failure is classified as.

`FakeServer` stands in for the MLflow server in these unit tests only (it records every call
and fails on demand, which a real server will not do at a chosen moment). The same guarantees
against a real `mlflow server` are tested in test_outage.py and test_tracking_errors.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from tinytale.mlflow_tracker import SPOOL_NAME
from tinytale.mlflow_tracker.connection import (
    AccessRefused,
    Failure,
    NotSent,
    RecordRejected,
    ServerUnavailable,
    classify,
)
from tinytale.mlflow_tracker.replay import MAX_BATCH_METRICS, MAX_PERMANENT_FAILURES, Replayer
from tinytale.mlflow_tracker.spool import Spool


class FakeServer:
    """Takes what the Replayer sends and keeps it; `fail_before` and `fail_after` hold the
    errors the next log_batch calls raise before taking the batch and after taking it (an
    answer lost on the way back)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.batches: list[list[Metric]] = []
        self.metrics: dict[str, list[Metric]] = {}
        self.history_reads: list[str] = []
        self.fail_before: list[Exception] = []
        self.fail_after: list[Exception] = []
        self.experiment: Any = None
        self.status: str | None = None

    def get_experiment_by_name(self, name: str) -> Any:
        self.calls.append("get_experiment_by_name")
        return self.experiment

    def create_experiment(self, name: str, artifact_location: str | None = None,
                          tags: dict | None = None) -> str:
        self.calls.append("create_experiment")
        self.experiment = SimpleNamespace(experiment_id="1", lifecycle_stage="active")
        return "1"

    def search_runs(self, experiment_ids: list[str], filter_string: str,
                    max_results: int) -> list:
        self.calls.append("search_runs")
        return []

    def create_run(self, experiment_id: str, start_time: int, tags: dict,
                   run_name: str) -> Any:
        self.calls.append("create_run")
        if self.fail_before:
            raise self.fail_before.pop(0)
        return SimpleNamespace(info=SimpleNamespace(run_id="r1", experiment_id=experiment_id))

    def log_batch(self, run_id: str, metrics: list[Metric] = (), params: list = (),
                  tags: list = (), synchronous: bool = True) -> None:
        self.calls.append("log_batch")
        if self.fail_before:
            raise self.fail_before.pop(0)
        if any("?" in m.key for m in metrics):
            raise MlflowException("Invalid metric name: '?'", INVALID_PARAMETER_VALUE)
        if metrics:
            self.batches.append(list(metrics))
        for m in metrics:
            self.metrics.setdefault(m.key, []).append(m)
        if self.fail_after:
            raise self.fail_after.pop(0)

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        self.history_reads.append(key)
        return list(self.metrics.get(key, []))

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self.calls.append("set_terminated")
        self.status = status

    def steps(self, key: str) -> list[int]:
        return sorted(m.step for m in self.metrics.get(key, []))


def now() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / SPOOL_NAME)
    spool.append({"op": "open", "ts": now(), "experiment": "e", "run_name": "r", "tags": {},
                  "local_id": "local-1"})
    yield spool
    spool.close()


def metrics(spool: Spool, steps: range, keys: tuple[str, ...] = ("loss",)) -> None:
    for step in steps:
        spool.append({"op": "m", "step": step, "ts": now(),
                      "metrics": {k: 1.0 / step for k in keys}})


def replayer(spool: Spool, server: FakeServer) -> Replayer:
    # A local-store URI: the health probe answers True without a network, nothing is created.
    r = Replayer(spool, f"sqlite:///{spool.path.parent / 'never-created.db'}")
    r.client = server
    return r


def push_until_done(r: Replayer, tries: int = 20) -> int:
    """Push until the spool is acknowledged; the number of pushes that raised NotSent."""
    failed = 0
    for _ in range(tries):
        try:
            if r.push():
                return failed
        except NotSent:
            failed += 1
    raise AssertionError(f"still pending after {tries} pushes: {r.pending()[:3]}")


def acks(spool: Spool) -> int:
    return max((r["upto"] for r in spool.records if r.get("op") == "ack"), default=0)


def test_batches_hold_at_most_max_batch_metrics_and_keep_the_order(spool: Spool) -> None:
    server = FakeServer()
    metrics(spool, range(1, 801), keys=("a", "b", "c"))  # 2400 metrics in 800 records
    r = replayer(spool, server)
    assert r.push() and not r.pending()
    sizes = [len(b) for b in server.batches]
    assert max(sizes) <= MAX_BATCH_METRICS and sum(sizes) == 2400
    assert all(size % 3 == 0 for size in sizes), "a record was split across batches"
    sent = [m.step for b in server.batches for m in b if m.key == "a"]
    assert sent == list(range(1, 801))
    assert acks(spool) == spool.next_seq - 1 and r.pushed_metrics == 2400
    # Unacknowledged records of a spool it did not write may be on the server already:
    # one history read per key, not per batch.
    assert sorted(server.history_reads) == ["a", "b", "c"]


def test_a_step_acknowledged_before_is_not_sent_again(spool: Spool) -> None:
    """A resumed epoch logs a (key, step) again: the first value stays. The acks say what is
    on the server; a new process also reads the history once per key, for what an earlier
    process sent without living to write its ack."""
    server = FakeServer()
    metrics(spool, range(1, 4))
    r = replayer(spool, server)
    assert r.push() and server.history_reads == ["loss"]
    metrics(spool, range(3, 5))  # step 3 again, then 4
    assert r.push()
    assert server.steps("loss") == [1, 2, 3, 4] and r.pushed_metrics == 4
    assert server.history_reads == ["loss"], "the acks were enough"
    metrics(spool, range(4, 6))  # step 4 again, then 5
    again = replayer(spool, server)  # a new process: what it knows comes from the spool
    assert again.push()
    assert server.steps("loss") == [1, 2, 3, 4, 5] and again.pushed_metrics == 1
    assert server.history_reads == ["loss", "loss"]


def test_a_batch_whose_answer_was_lost_is_not_sent_twice(spool: Spool) -> None:
    """The server took the batch but the answer never came: no ack, and the resend reads
    the history first, so each (key, step) is logged once."""
    server = FakeServer()
    metrics(spool, range(1, 6))
    server.fail_after.append(ConnectionError("connection reset by peer"))
    r = replayer(spool, server)
    with pytest.raises(ServerUnavailable):
        r.push()
    assert acks(spool) == 1, "only the open record may be acknowledged"
    assert r.push()
    assert server.steps("loss") == [1, 2, 3, 4, 5]
    assert server.history_reads == ["loss", "loss"]  # at the start, and after the lost answer


def test_a_batch_that_did_not_land_is_sent_again(spool: Spool) -> None:
    server = FakeServer()
    metrics(spool, range(1, 3))
    r = replayer(spool, server)
    assert r.push()
    metrics(spool, range(3, 6))
    server.fail_before.append(MlflowException("the server is busy", TEMPORARILY_UNAVAILABLE))
    with pytest.raises(ServerUnavailable):
        r.push()
    assert len(r.pending()) == 3
    metrics(spool, range(6, 8))  # training went on meanwhile
    assert r.push()
    assert server.steps("loss") == [1, 2, 3, 4, 5, 6, 7]


def test_only_the_invalid_record_of_a_batch_is_skipped(spool: Spool) -> None:
    server = FakeServer()
    metrics(spool, range(1, 3))
    bad = spool.append({"op": "m", "step": 3, "ts": now(), "metrics": {"loss": 0.3, "x?": 1}})
    metrics(spool, range(4, 6))
    spool.append({"op": "end", "status": "FINISHED", "ts": now()})
    r = replayer(spool, server)
    failed = push_until_done(r)
    # The batch fails once, then the bad record alone until it is skipped.
    assert failed == 1 + MAX_PERMANENT_FAILURES - 1
    assert server.steps("loss") == [1, 2, 4, 5], "the bad record's valid metric goes with it"
    assert r.failures == {bad["seq"]: MAX_PERMANENT_FAILURES}
    assert server.status == "FINISHED" and not r.pending()


def test_a_rejected_open_record_is_never_skipped(spool: Spool) -> None:
    server = FakeServer()
    metrics(spool, range(1, 3))
    server.fail_before.extend(MlflowException("bad run name", INVALID_PARAMETER_VALUE)
                              for _ in range(MAX_PERMANENT_FAILURES + 2))
    r = replayer(spool, server)
    for _ in range(MAX_PERMANENT_FAILURES + 2):
        with pytest.raises(RecordRejected, match="stays spooled"):
            r.push()
    assert acks(spool) == 0 and len(r.pending()) == 3 and r.run_id is None
    assert r.push() and server.steps("loss") == [1, 2]


def test_a_refusal_sends_nothing_and_skips_nothing(spool: Spool, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    server = FakeServer()
    metrics(spool, range(1, 3))
    r = replayer(spool, server)
    assert r.push()
    metrics(spool, range(3, 5))
    server.fail_before.extend(MlflowException("no", PERMISSION_DENIED) for _ in range(5))
    for _ in range(5):  # more tries than an invalid record gets
        with pytest.raises(AccessRefused) as refused:
            r.push()
    assert "denied user 'trainer' permission (HTTP 403)" in refused.value.what
    assert len(r.pending()) == 2 and r.failures == {}
    assert r.push() and server.steps("loss") == [1, 2, 3, 4]


# ---- classification -----------------------------------------------------------------------------

LOCAL = "sqlite:////nowhere/mlflow.db"  # healthy by definition: no probe, no network


@pytest.mark.parametrize(("exc", "failure"), [
    (ConnectionError("refused"), Failure.UNREACHABLE),
    (TimeoutError("read timed out"), Failure.UNREACHABLE),
    (MlflowException("busy", TEMPORARILY_UNAVAILABLE), Failure.BUSY),
    (RuntimeError("(sqlite3.OperationalError) database is locked"), Failure.BUSY),
    (MlflowException("bad value", INVALID_PARAMETER_VALUE), Failure.INVALID),
    (MlflowException("no such run", RESOURCE_DOES_NOT_EXIST), Failure.OTHER),
    (MlflowException("no", PERMISSION_DENIED), Failure.REFUSED),
])
def test_failures_are_classified(exc: Exception, failure: Failure) -> None:
    assert classify(exc, LOCAL) is failure


def test_a_refusal_is_found_behind_the_error_it_caused() -> None:
    try:
        try:
            raise MlflowException("no", PERMISSION_DENIED)
        except MlflowException as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert classify(outer, LOCAL) is Failure.REFUSED


def test_importing_the_package_leaves_the_environment_alone() -> None:
    """MLflow's settings are applied where a client is made, and a user's value wins."""
    code = """
import json, os
import mlflow  # its own import sets a telemetry session id
before = dict(os.environ)
import tinytale.mlflow_tracker, tinytale.mlflow_tracker.reader
untouched = dict(os.environ) == before
from tinytale.mlflow_tracker.connection import make_client
make_client("sqlite:////nowhere/mlflow.db")
import logging
print(json.dumps({"untouched": untouched, "level": logging.getLogger("mlflow").level,
                  **{k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "7"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("untouched") is True
    assert out.pop("level") == 30  # WARNING
    assert out == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "7", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
