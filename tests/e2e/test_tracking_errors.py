"""Tracking errors a user can fix: a tracking URI MLflow cannot use, a server that refuses our
login or our Host header. Training must not start when it would log nothing (one sentence,
exit 2, nothing on disk), and a refusal mid-run must never cost a record: the spool keeps
every one until `tinytale sync` with good credentials sends them, once.

The servers are the one we ship, started by docker/mlflow-server.sh as in test_security.py:
one with basic auth on, one that answers only the Host header `localhost:PORT`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.configs import TINY
from support.holding import hold_env, release, wait_held
from support.shipped_server import (
    Shipped,
    _has_auth_extra,
    _spawn,
    needs_auth_extra,
    started_together,
)
from support.spool import spool_records
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.mlflow_tracker import SPOOL_NAME, sync_spool
from tinytale.mlflow_tracker.connection import AccessRefused, NotSent
from tinytale.mlflow_tracker.replay import Replayer
from tinytale.mlflow_tracker.spool import Spool

REPO = Path(__file__).resolve().parents[2]
FAST = [*TINY, "train.epochs=2", "data.n_stories=24", "train.num_threads=1",
        "tracking.system_metrics=false"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def clean_env(**values: str) -> dict[str, str]:
    """This environment without MLflow settings, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(values)
    return env


# ---- tracking URIs MLflow cannot use ---------------------------------------------------------


def bad_store_uris(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "no such folder under /proc": "sqlite:////proc/nope/x.db",
        "a folder nothing can be created in": "sqlite:////proc/x.db",
        "sqlite under a file": f"sqlite:///{a_file}/x.db",
        "sqlite naming a folder": f"sqlite:///{tmp_path}",
        "file store under a file": f"file://{a_file}/mlruns",
        "plain path under a file": f"{a_file}/mlruns",
    }


@pytest.mark.parametrize("case", ["no such folder under /proc",
                                  "a folder nothing can be created in", "sqlite under a file",
                                  "sqlite naming a folder", "file store under a file",
                                  "plain path under a file"])
def test_a_local_store_that_cannot_be_created_is_one_sentence(tmp_path: Path, case: str) -> None:
    uri = bad_store_uris(tmp_path)[case]
    before = files_under(tmp_path)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri", uri,
                                      "--out", str(out)])
    assert result.exit_code == 2, (result.stderr, result.exception)
    (line,) = result.stderr.strip().splitlines()
    assert f"tracking URI '{uri}'" in line and "sqlite:///PATH.db" in line, line
    assert files_under(tmp_path) == before, "a refused URI must touch nothing"
    assert not out.exists()


def test_the_uri_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    uri = "sqlite:////proc/nope/x.db"
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--out", str(out)],
                                env={"MLFLOW_TRACKING_URI": uri})
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert f"tracking URI '{uri}'" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway; "
                    "the /proc cases above stand in for it")
def test_a_read_only_folder_is_one_sentence(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = tmp_path / "runs"
    try:
        result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri",
                                          f"sqlite:///{locked}/sub/x.db", "--out", str(out)])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "cannot be created" in result.stderr and result.stderr.count("\n") == 1
    assert not any(locked.iterdir()) and not out.exists()


def test_the_file_store_mlflow_refuses_is_one_sentence(tmp_path: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri", uri,
                                      "--out", str(tmp_path / "runs")],
                                env={"MLFLOW_ALLOW_FILE_STORE": None})
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "file store" in result.stderr and "sqlite:///PATH.db" in result.stderr
    assert files_under(tmp_path) == []


# ---- servers that answer but refuse us ----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Shipped]]:
    """docker/mlflow-server.sh twice, in parallel: basic auth on; Host `localhost` only."""
    spawns = {"strict": lambda: _spawn(tmp_path_factory.mktemp("strict-host"),
                                       MLFLOW_SERVER_ALLOWED_HOSTS="localhost:{port}")}
    if _has_auth_extra():
        spawns["auth"] = lambda: _spawn(tmp_path_factory.mktemp("auth"),
                                        password=secrets.token_urlsafe(18))
    with started_together(spawns) as started:
        yield started


@pytest.fixture(scope="module")
def authed(shipped: dict[str, Shipped]) -> Shipped:
    if "auth" not in shipped:
        pytest.fail("Flask-WTF is missing: the basic-auth server cannot start")
    return shipped["auth"]


@pytest.fixture(scope="module")
def strict(shipped: dict[str, Shipped]) -> Shipped:
    return shipped["strict"]


def url(server: Shipped, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.port}"


def new_user(server: Shipped) -> tuple[str, str]:
    """A user of the auth server (created by the admin), with its password."""
    user, password = f"trainer-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(18)
    status, body = server.api("POST", "users/create", {"username": user, "password": password})
    assert status == 200, body
    return user, password


def set_password(server: Shipped, user: str, password: str) -> None:
    status, body = server.api("PATCH", "users/update-password",
                              {"username": user, "password": password})
    assert status == 200, body


def experiment_of(server: Shipped, name: str) -> dict | None:
    status, body = server.api("GET", f"experiments/get-by-name?experiment_name={name}", {})
    return body["experiment"] if status == 200 else None


@needs_auth_extra
def test_a_wrong_password_stops_training_before_it_starts(authed: Shipped,
                                                          tmp_path: Path) -> None:
    """`tinytale train` with auth on and a wrong password: one sentence, exit 2, no run."""
    name = f"wrong-pw-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "tinytale", "train", *sets(FAST), "--experiment", name,
            "--tracking-uri", url(authed), "--out", str(out), "--json"]
    env = clean_env(MLFLOW_TRACKING_USERNAME="admin",
                    MLFLOW_TRACKING_PASSWORD="not-" + (authed.password or ""))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert url(authed) in line and "refused the login of user 'admin'" in line, line
    assert "MLFLOW_TRACKING_PASSWORD" in line and (authed.password or "?") not in line
    assert not out.exists(), files_under(out)
    assert experiment_of(authed, name) is None, "nothing may reach the server"


@needs_auth_extra
def test_no_credentials_at_all_is_one_sentence(authed: Shipped, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--tracking-uri", url(authed),
                                      "--out", str(tmp_path / "runs")],
                                env={"MLFLOW_TRACKING_USERNAME": None,
                                     "MLFLOW_TRACKING_PASSWORD": None})
    assert result.exit_code == 2, (result.stderr, result.exception)
    (line,) = result.stderr.strip().splitlines()
    assert "requires a login" in line and "MLFLOW_TRACKING_USERNAME" in line, line
    assert files_under(tmp_path) == []


def test_a_refused_host_header_stops_training_before_it_starts(strict: Shipped,
                                                               tmp_path: Path) -> None:
    name = f"host-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--experiment", name,
                                      "--tracking-uri", url(strict), "--out",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 2, (result.stderr, result.exception)
    (line,) = result.stderr.strip().splitlines()
    assert f"refuses the Host header '127.0.0.1:{strict.port}'" in line, line
    assert "allowed hosts" in line
    assert files_under(tmp_path) == []
    # The same server under a host name it allows has no such experiment: nothing reached it.
    assert MlflowClient(url(strict, "localhost")).get_experiment_by_name(name) is None


@needs_auth_extra
def test_no_permission_on_the_experiment_stops_training(authed: Shipped,
                                                        tmp_path: Path) -> None:
    """The login is good, but the experiment is the admin's and others may only read it:
    the run cannot be created, so training does not start, and its spool is removed."""
    name = f"admins-{uuid.uuid4().hex[:8]}"
    status, body = authed.api("POST", "experiments/create", {"name": name})
    assert status == 200, body
    user, password = new_user(authed)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", *sets(FAST), "--experiment", name,
                                      "--tracking-uri", url(authed), "--out", str(out)],
                                env={"MLFLOW_TRACKING_USERNAME": user,
                                     "MLFLOW_TRACKING_PASSWORD": password})
    assert result.exit_code == 2, (result.stderr, result.exception)
    last = result.stderr.strip().splitlines()[-1]
    assert f"denied user '{user}' permission (HTTP 403)" in last, result.stderr
    assert not out.exists(), files_under(out)
    status, body = authed.api("POST", "runs/search", {"experiment_ids": [body["experiment_id"]]})
    assert status == 200 and not body.get("runs"), body


# ---- refusals mid-run: records stay spooled, sync sends them once -------------------------------


def acked(path: Path) -> int:
    """The spool's acknowledged seq: every record up to it is on the server."""
    return max((r["upto"] for r in spool_records(path) if r.get("op") == "ack"), default=0)


def write_open(spool: Spool, experiment: str) -> None:
    spool.append({"op": "open", "ts": int(time.time() * 1000), "experiment": experiment,
                  "run_name": "refusals", "tags": {}, "local_id": uuid.uuid4().hex})


def write_metrics(spool: Spool, steps: range) -> None:
    for step in steps:
        spool.append({"op": "m", "step": step, "ts": int(time.time() * 1000),
                      "metrics": {"loss": 1.0 / step}})


def push_until_refused(replayer: Replayer, tries: int = 5) -> AccessRefused:
    """Push a few times (more than the tries after which an invalid record is skipped)."""
    for _ in range(tries):
        with pytest.raises(AccessRefused) as caught:
            replayer.push()
    return caught.value


@needs_auth_extra
def test_a_login_refused_mid_run_keeps_every_record(
    authed: Shipped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay level: records pushed while the login is refused stay unsent, however often
    they are tried, and a sync with good credentials sends them, once."""
    user, password = new_user(authed)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    path = tmp_path / SPOOL_NAME
    spool = Spool(path)
    write_open(spool, f"revoked-{uuid.uuid4().hex[:8]}")
    write_metrics(spool, range(1, 4))
    replayer = Replayer(spool, url(authed))
    assert replayer.push()
    run_id = replayer.run_id
    assert run_id and acked(path) == 4

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "revoked-" + password)
    write_metrics(spool, range(4, 8))
    spool.append({"op": "end", "status": "FINISHED", "ts": int(time.time() * 1000)})
    refused = push_until_refused(replayer)
    assert f"refused the login of user '{user}' (HTTP 401)" in refused.what
    assert acked(path) == 4 and len(replayer.pending()) == 5, "a refused record was sent"
    spool.close()

    # The spool written here names no tracking URI (the tracker's does): name the server.
    with pytest.raises(Exception, match="refused the login") as failed:
        sync_spool(path, url(authed))
    assert "5 records stay" in str(failed.value)
    assert acked(path) == 4

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    result = sync_spool(path, url(authed))
    assert result["run_id"] == run_id and result["complete"] and result["metrics_sent"] == 4
    client = MlflowClient(url(authed))
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 8))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sync_spool(path, url(authed))["records_sent"] == 0


def test_a_refused_host_header_keeps_every_record(strict: Shipped, tmp_path: Path) -> None:
    """Replay level, 403: nothing is sent to a host the server refuses, and the spool goes
    to the same server under an allowed host name later, each metric once."""
    path = tmp_path / SPOOL_NAME
    spool = Spool(path)
    name = f"host-{uuid.uuid4().hex[:8]}"
    write_open(spool, name)
    write_metrics(spool, range(1, 6))
    refused = push_until_refused(Replayer(spool, url(strict)))
    assert "Host header" in refused.what and "HTTP 403" in refused.what
    assert acked(path) == 0
    spool.close()

    result = sync_spool(path, url(strict, "localhost"))
    assert result["complete"] and result["metrics_sent"] == 5
    client = MlflowClient(url(strict, "localhost"))
    assert sorted(m.step for m in client.get_metric_history(result["run_id"], "loss")) == \
        [1, 2, 3, 4, 5]
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.run_id == result["run_id"]


def test_only_the_invalid_record_of_a_batch_is_skipped(
    mlflow_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metric the server rejects as invalid is dropped, with a warning, after a few tries;
    the good metrics sent in the same batch are not dropped with it."""
    path = tmp_path / SPOOL_NAME
    spool = Spool(path)
    write_open(spool, f"invalid-{uuid.uuid4().hex[:8]}")
    write_metrics(spool, range(1, 3))
    bad = spool.append({"op": "m", "step": 3, "ts": int(time.time() * 1000),
                        "metrics": {"loss": 0.3, "no?such*key": 1.0}})
    write_metrics(spool, range(4, 6))
    replayer = Replayer(spool, mlflow_server.url)
    with caplog.at_level(logging.WARNING, logger="tinytale.mlflow"):
        for _ in range(10):
            try:
                if replayer.push():
                    break
            except NotSent:
                continue
    assert not replayer.pending()
    history = MlflowClient(mlflow_server.url).get_metric_history(replayer.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 4, 5]
    assert f"spool record {bad['seq']}" in caplog.text and "skipping it" in caplog.text
    spool.close()


@needs_auth_extra
def test_a_password_changed_mid_run_then_sync(
    authed: Shipped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole story: `tinytale train` logs as a user whose password the admin changes
    after epoch 1 reached the server. Training finishes (exit 0) and says what is pending;
    `tinytale sync RUN_DIR` with the new password sends the rest, each epoch once.

    The trainer is held at the start of epoch 2 (tests/support/holding.py) while the password
    changes, so that epochs are still to come after it however fast this machine trains
    (as in test_outage.py).
    """
    user, password = new_user(authed)
    name = f"rotated-{uuid.uuid4().hex[:8]}"
    epochs = 4
    out = tmp_path / "runs"
    env = clean_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password,
                    TINYTALE_TRACKING_FLUSH_S="0.2")
    overrides = [*TINY, f"train.epochs={epochs}", "train.num_threads=1",
                 "tracking.system_metrics=false", f"tracking.registered_model={name}"]
    argv = [str(Path(sys.executable).with_name("tinytale")), "train", *sets(overrides),
            "--experiment", name, "--tracking-uri", url(authed), "--out", str(out), "--json"]
    hold = tmp_path / "hold"
    proc = subprocess.Popen(argv, env=hold_env(hold, 2, 1, env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_held(hold, proc)
        spool = next(out.rglob(SPOOL_NAME))
        deadline = time.monotonic() + 180
        while True:  # until epoch 1 is on the server
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "epoch 1 never reached the server"
            epoch_seqs = [r["seq"] for r in spool_records(spool)
                          if r.get("op") == "m" and "val_loss" in r["metrics"]]
            if epoch_seqs and acked(spool) >= epoch_seqs[0]:
                break
            time.sleep(0.05)
        assert len(epoch_seqs) == 1, "held in epoch 2, yet more than epoch 1 was logged"
        set_password(authed, user, new_password := secrets.token_urlsafe(18))
        release(hold)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert summary["run_id"] and summary["registration"] == "pending", summary
    refusals = [line for line in stderr.splitlines() if "refused the login" in line]
    assert len(refusals) == 2, stderr[-3000:]  # the warning, once, and the final word
    assert f"tinytale sync {run_dir}" in refusals[-1] and "wait in" in refusals[-1]
    spool = run_dir / SPOOL_NAME
    pending = [r for r in spool_records(spool) if r.get("seq", 0) > acked(spool)]
    assert any(r["op"] == "m" and "val_loss" in r["metrics"] for r in pending), \
        "no epoch was refused: the password changed too late to test anything"
    assert any(r["op"] == "end" for r in pending) and any(r["op"] == "model" for r in pending)

    sync = [str(Path(sys.executable).with_name("tinytale")), "sync", str(run_dir), "--json"]
    done = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "refused the login" in done.stderr and acked(spool) < pending[-1]["seq"]

    env["MLFLOW_TRACKING_PASSWORD"] = new_password
    done = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["complete"] and result["run_id"] == summary["run_id"]
    assert result["registered_version"] == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", new_password)
    client = MlflowClient(url(authed))
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    for key in ("train_loss", "val_loss"):
        steps = sorted(m.step for m in client.get_metric_history(summary["run_id"], key))
        assert steps == list(range(1, epochs + 1)), (key, steps)
