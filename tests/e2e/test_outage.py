"""Tracking outages: the server is away at start or goes away mid-run. Training goes on,
the spool keeps everything, and the replay (in finish, or by `tinytale sync`) logs every
metric exactly once and registers the model once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mlflow import MlflowClient
from support.configs import TINY
from support.holding import hold_env, release, wait_held
from support.server import free_port
from support.spool import spool_records
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.mlflow_tracker import SPOOL_NAME

EPOCH_METRICS = ("train_loss", "val_loss", "val_perplexity", "lr", "grad_norm",
                 "tokens_per_sec", "epoch_time_s", "generalization_gap")


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def assert_once_per_epoch(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)




def sync(*args: str) -> dict:
    result = CliRunner().invoke(app, ["sync", *args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_train(url: str, out: Path, wait_s: int, *args: str,
                base_env: dict[str, str] | None = None, **env_extra: str) -> subprocess.Popen:
    """`tinytale train` on TINY as a real process logging to `url`, waiting up to `wait_s`
    for the server when the run ends."""
    env = {**(base_env or os.environ), "TINYTALE_TRACKING_WAIT_S": str(wait_s), **env_extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("tinytale")), "train", *sets(TINY), *args,
         "--set", "tracking.system_metrics=false", "--tracking-uri", url,
         "--out", str(out), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def registered_summary(proc: subprocess.Popen, out: str, err: str, url: str) -> dict:
    """The run's --json summary, checked: version 1 is registered, the champion, of this run."""
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["registered_version"] == "1", (summary, err[-2000:])
    client = MlflowClient(url)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias("tinytale", "champion").tags["run_id"] == \
        summary["run_id"]
    return summary


def test_log_metrics_never_waits_for_a_dead_server(tmp_path, monkeypatch):
    """Against a port where nothing listens, the loop's calls cost microseconds."""
    from tinytale.config import load_config
    from tinytale.mlflow_tracker import MlflowTracker
    from tinytale.tracking import RunInfo

    monkeypatch.setenv("TINYTALE_TRACKING_WAIT_S", "0")
    monkeypatch.setenv("TINYTALE_TRACKING_FLUSH_S", "0.05")  # retry all the time
    cfg = load_config(None, ["tracking.system_metrics=false"])
    tracker = MlflowTracker(cfg, f"http://127.0.0.1:{free_port()}")
    run_id = tracker.start(RunInfo("e", "r", {"a": 1}, local_dir=tmp_path))
    assert run_id is None
    t0 = time.perf_counter()
    for step in range(2000):
        tracker.log_metrics({"train_loss_step": 1.0, "lr_step": 0.1}, step)
    per_call = (time.perf_counter() - t0) / 2000
    tracker.finish("FINISHED")
    assert per_call < 0.002, per_call
    recs = spool_records(tmp_path / SPOOL_NAME)
    assert sum(r.get("op") == "m" for r in recs) == 2000  # the run's summary is a tags record
    assert any(r.get("op") == "tags" and "tinytale.epochs" in r["tags"] for r in recs)
    assert not any(r.get("op") == "ack" for r in recs)


def test_server_down_at_start_then_sync(mlflow_server, tmp_path, monkeypatch):
    """No server at all during training; `tinytale sync` later creates and fills the run."""
    monkeypatch.setenv("TINYTALE_TRACKING_WAIT_S", "0")
    name = f"offline-{uuid.uuid4().hex[:8]}"
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, [
        "train", *sets(TINY), "--set", f"tracking.registered_model={name}",
        "--experiment", name, "--tracking-uri", dead, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["run_id"] is None and summary["registration"] == "pending"
    assert "unreachable" in result.stderr
    run_dir = Path(summary["run_dir"])

    first = sync(str(run_dir), "--tracking-uri", mlflow_server.url)
    client = MlflowClient(mlflow_server.url)
    run_id = first["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lesson"
    assert run.data.params["model.n_embd"] == "16"
    assert_once_per_epoch(client, run_id, 3)
    assert {"config.yaml", "samples.txt"} <= {a.path for a in client.list_artifacts(run_id)}
    assert first["registered_version"] == "1" and first["champion"] is True
    assert client.get_model_version_by_alias(name, "champion").tags["run_id"] == run_id

    # Nothing left: a second sync (by run id this time) sends nothing.
    again = sync(run_id, "--out", str(tmp_path), "--tracking-uri", mlflow_server.url)
    assert again["records_sent"] == 0 and again["run_id"] == run_id

    # Lost acknowledgements (a crash right after the server took the data): the replay
    # finds the run, the metrics and the model version it already created.
    spool = run_dir / SPOOL_NAME
    kept = [line for line in spool.read_text().splitlines()
            if json.loads(line).get("op") not in ("ack", "run", "registered")]
    spool.write_text("\n".join(kept) + "\n")
    replay = sync(str(run_dir), "--tracking-uri", mlflow_server.url)
    assert replay["run_id"] == run_id and replay["metrics_sent"] == 0
    assert replay["registered_version"] == "1"
    exp = client.get_experiment_by_name(name)
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert_once_per_epoch(client, run_id, 3)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_server_restarted_mid_run(fresh_mlflow_server, tmp_path):
    """Stop the server after epoch 1 reached it, restart it later: nothing lost or doubled.

    The trainer is held at the start of epoch 2 (tests/support/holding.py) until epoch 1 is on the
    server and the server has shut down, so the epochs after the outage began exist however
    fast this machine trains: without it a quick run finished most of its epochs during the
    server's own graceful shutdown.
    """
    server = fresh_mlflow_server
    epochs = 6
    hold = tmp_path / "hold"
    proc = start_train(server.url, tmp_path / "runs", 120, "--set", f"train.epochs={epochs}",
                       base_env=hold_env(hold, 2, 1), TINYTALE_TRACKING_FLUSH_S="0.3")

    def epoch_records(spool: Path) -> list[dict]:
        return [r for r in spool_records(spool)
                if r.get("op") == "m" and "val_loss" in r["metrics"]]

    try:
        wait_held(hold, proc)
        spool = next((tmp_path / "runs").rglob(SPOOL_NAME))
        deadline = time.monotonic() + 120
        # Wait until epoch 1 is acknowledged by the server.
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "epoch 1 never reached the server"
            acked = max((r["upto"] for r in spool_records(spool) if r.get("op") == "ack"),
                        default=0)
            epoch_seqs = [r["seq"] for r in epoch_records(spool)]
            if epoch_seqs and acked >= epoch_seqs[0]:
                break
            time.sleep(0.05)
        assert len(epoch_seqs) == 1, "held in epoch 2, yet more than epoch 1 was logged"
        server.stop()
        release(hold)
        # Training goes on while the server is away: more epochs are spooled.
        deadline = time.monotonic() + 120
        while len(epoch_records(spool)) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training stopped while the server was down"
            time.sleep(0.1)
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = registered_summary(proc, out, err, server.url)
    assert_once_per_epoch(MlflowClient(server.url), summary["run_id"], epochs)


def test_server_back_while_finish_waits(fresh_mlflow_server, tmp_path):
    """The server is away for the whole run and comes back while finish() waits for it:
    the summary the user reads names the run and the model version, not "pending"."""
    server = fresh_mlflow_server
    server.stop()
    proc = start_train(server.url, tmp_path / "runs", 120)
    try:
        deadline = time.monotonic() + 120
        while True:  # until training is over and finish() is waiting
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached finish()"
            found = list((tmp_path / "runs").rglob(SPOOL_NAME))
            if found and any(r.get("op") == "end" for r in spool_records(found[0])):
                break
            time.sleep(0.05)
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = registered_summary(proc, out, err, server.url)
    assert "registration" not in summary and "spool" not in summary, summary
