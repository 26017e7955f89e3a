"""Sweeps: the file format and its mistakes, grid expansion, and a tiny real sweep through the
CLI against a real MLflow server (nesting, tags, skip-on-rerun, a failing point)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.holding import hold_env, wait_held
from support.server import free_port
from typer.testing import CliRunner

from tinytale.checkpoint import peek_checkpoint, save_checkpoint
from tinytale.cli import app
from tinytale.config import Config, load_config, parse_override
from tinytale.errors import UserError
from tinytale.sweep import (
    MAX_EXIT_FAILED,
    PointResult,
    SweepResult,
    expand_grid,
    load_sweep,
    overrides_key,
    point_run_name,
    resolved_overrides,
    resumable_point,
)
from tinytale.sweep.protocol import error_of

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def write(tmp_path: Path, body: dict | str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text("model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\ntrain:\n  epochs: 2\n")
    return path


# --------------------------------------------------------------------------- expansion


def test_grid_expands_to_every_combination_first_key_slowest():
    points = expand_grid({"model.dropout": [0.0, 0.1, 0.3], "train.weight_decay": [0.0, 0.1]})
    assert len(points) == 6
    assert points[0] == {"model.dropout": 0.0, "train.weight_decay": 0.0}
    assert points[1] == {"model.dropout": 0.0, "train.weight_decay": 0.1}
    assert points[-1] == {"model.dropout": 0.3, "train.weight_decay": 0.1}
    assert expand_grid({}) == []


def test_load_sweep_grid_points_and_set(tmp_path, base):
    spec = load_sweep(write(tmp_path, {
        "name": "reg", "base": "base.yaml", "experiment": "study",
        "set": {"train.epochs": 3},
        "grid": {"model.dropout": [0.0, 0.2], "data.train_fraction": [0.5, 1]},
        "points": [{"model.n_layer": 2}, {"train.epochs": 5, "model.dropout": 0.1}],
    }))
    assert spec.name == "reg" and spec.experiment == "study" and spec.base == base
    assert [p.run_name for p in spec.points] == [
        "dropout=0,train_fraction=0.5", "dropout=0,train_fraction=1",
        "dropout=0.2,train_fraction=0.5", "dropout=0.2,train_fraction=1",
        "n_layer=2", "epochs=5,dropout=0.1"]
    # A point's own value wins over the shared `set`, as the later --set does.
    assert spec.set_args(spec.points[5]) == ["train.epochs=5", "model.dropout=0.1"]
    assert spec.set_args(spec.points[4]) == ["train.epochs=3", "model.n_layer=2"]


def test_base_is_found_relative_to_the_cwd_too(tmp_path, base, monkeypatch):
    sub = tmp_path / "sweeps"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(write(sub, {"name": "s", "base": "base.yaml",
                                  "points": [{"model.dropout": 0.1}]}))
    assert spec.base == Path("base.yaml")


@pytest.mark.parametrize("value", [0.1, 3e-4, 1e-10, 7, "lesson", "some/path.txt", True, None])
def test_set_args_round_trip_through_parse_override(value):
    spec_value = json.dumps(value)
    assert parse_override(f"data.corpus={spec_value}")[2] == value


def test_resolved_overrides_read_values_as_the_config_does(tmp_path, base):
    spec = load_sweep(write(tmp_path, {"name": "s", "base": "base.yaml", "grid": {
        "model.dropout": [0, 0.5], "model.n_head": [3]}}))
    # n_head=3 does not divide n_embd=16: the config is invalid, the values stay as written.
    assert resolved_overrides(spec, spec.points[0]) == {"model.dropout": 0, "model.n_head": 3}
    spec = load_sweep(write(tmp_path, {"name": "s", "base": "base.yaml",
                                       "grid": {"model.dropout": [0]}}))
    assert resolved_overrides(spec, spec.points[0]) == {"model.dropout": 0.0}


def test_overrides_key_ignores_order():
    assert overrides_key({"a.b": 1, "c.d": 2}) == overrides_key({"c.d": 2, "a.b": 1})


def test_point_run_name():
    assert point_run_name({}) == "base"
    assert point_run_name({"data.corpus": "my/tales.txt"}) == "corpus=my_tales.txt"
    assert point_run_name({"data.seed": 1, "train.seed": 1}) == "data.seed=1,train.seed=1"


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize("body, message", [
    ("- a\n- b\n", "must be a mapping"),
    ("name: [oops\n", "is not valid YAML"),
    ({"base": "base.yaml", "grid": {"model.dropout": [0.1]}}, "needs a name"),
    ({"name": "has space", "base": "base.yaml", "grid": {"model.dropout": [0.1]}},
     "needs a name"),
    ({"name": "s", "grid": {"model.dropout": [0.1]}}, "needs base"),
    ({"name": "s", "base": "nope.yaml", "grid": {"model.dropout": [0.1]}},
     "base 'nope.yaml'"),
    ({"name": "s", "base": "base.yaml", "grids": {}}, "unknown key 'grids'"),
    ({"name": "s", "base": "base.yaml"}, "has no points"),
    ({"name": "s", "base": "base.yaml", "grid": {"model.dropuot": [0.1]}},
     "did you mean 'model.dropout'"),
    ({"name": "s", "base": "base.yaml", "grid": {"modle.dropout": [0.1]}},
     "unknown section"),
    ({"name": "s", "base": "base.yaml", "grid": {"dropout": [0.1]}}, "keys are section.key"),
    ({"name": "s", "base": "base.yaml", "grid": {"model.dropout": 0.1}}, "non-empty list"),
    ({"name": "s", "base": "base.yaml", "grid": {"model.dropout": []}}, "non-empty list"),
    ({"name": "s", "base": "base.yaml", "grid": {"model.dropout": [[0.1]]}},
     "values must be single"),
    ({"name": "s", "base": "base.yaml", "points": {"model.dropout": 0.1}},
     "must be a list of mappings"),
    ({"name": "s", "base": "base.yaml", "points": [{"model.dropout": 0.1},
                                                    {"model.dropout": 0.1}]}, "twice"),
    ({"name": "s", "base": "base.yaml", "points": [{"tracking.run_name": "x"}]},
     "sets itself"),
    ({"name": "s", "base": "base.yaml", "set": {"model.n_head": 5},
      "points": [{"model.dropout": 0.1}]}, "not divisible"),
])
def test_sweep_file_mistakes_are_one_sentence(tmp_path, base, body, message):
    with pytest.raises(UserError) as info:
        load_sweep(write(tmp_path, body))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_exit_code_counts_failures_capped():
    def result(statuses, interrupted=None):
        points = [PointResult(i, f"p{i}", {}, s) for i, s in enumerate(statuses)]
        return SweepResult("s", "e", "id", points, interrupted)

    assert result(["FINISHED", "SKIPPED"]).exit_code == 0
    assert result(["FINISHED", "FAILED", "FAILED"]).exit_code == 2
    assert result(["FAILED"] * 300).exit_code == MAX_EXIT_FAILED
    assert result(["FAILED"], "SIGINT").exit_code == 130


def test_error_of_reads_only_the_latest_attempt(tmp_path):
    log = tmp_path / "point.log"
    log.write_text("\n==== 2026-01-01 00:00:00 train a.yaml\nerror: disk full\n"
                   "\n==== 2026-01-02 00:00:00 train a.yaml --resume last.pt\nSegmentation\n")
    assert error_of(log, -11) == "exit code -11: Segmentation"
    with log.open("a") as f:
        f.write("\n==== 2026-01-03 00:00:00 train a.yaml\nerror: val_loss is nan\n")
    assert error_of(log, 1) == "val_loss is nan"
    assert error_of(tmp_path / "missing.log", 1) == "exit code 1: no output"


def test_resumable_point_needs_an_unfinished_checkpoint_of_the_same_config(tmp_path):
    point_dir = tmp_path / "dropout=0.1"
    assert resumable_point(point_dir, "abc") == (None, None, None)
    config = Config()
    last = save_checkpoint({"model": {}, "config": config.to_dict(), "run_id": "r1",
                            "finished": False}, point_dir / "20260101-000000" / "last.pt")
    assert resumable_point(point_dir, config.hash()) == (last, "r1", None)
    path, run_id, why = resumable_point(point_dir, "another-hash")
    assert (path, run_id) == (None, None) and why.startswith(f"not resuming {last}")
    save_checkpoint({"model": {}, "config": config.to_dict(), "run_id": "r1",
                     "finished": True}, last)
    assert resumable_point(point_dir, config.hash()) == (None, None, None)


def test_shipped_sweep_and_study_files_are_valid():
    for path in sorted((REPO / "experiments").glob("sweep_*.yaml")):
        spec = load_sweep(path)
        assert len(spec.points) >= 2, path
    over = load_config(REPO / "experiments" / "overfit.yaml")
    reg = load_config(REPO / "experiments" / "regularized.yaml")
    assert (over.model.dropout, over.train.weight_decay) == (0.0, 0.0)
    assert reg.model.dropout > 0 and reg.train.weight_decay > 0
    assert over.tracking.experiment == reg.tracking.experiment


# --------------------------------------------------------------------------- end to end


def tinytale(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINYTALE_TRACKING_FLUSH_S": "0.5", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tinytale", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tiny_sweep_end_to_end(mlflow_server, tmp_path, tiny_overrides, monkeypatch):
    from mlflow.tracking import MlflowClient

    base = tmp_path / "tiny.yaml"
    base.write_text("tracking:\n  experiment: sweep-e2e\n  register: false\n")
    sweep = write(tmp_path, {
        "name": "tiny", "base": "tiny.yaml",
        "set": {k: yaml.safe_load(v) for k, v in (o.split("=") for o in tiny_overrides)}
        | {"train.epochs": 2, "data.n_stories": 60, "tracking.samples": 0},
        "grid": {"model.dropout": [0.0, 0.1]},
        "points": [{"model.n_head": 3}],  # 16 is not divisible by 3: this point fails
    })
    args = ["sweep", str(sweep), "--tracking-uri", mlflow_server.url,
            "--out", str(tmp_path / "runs"), "--json", "--parallel", "2"]
    monkeypatch.setenv("TINYTALE_TRACKING_FLUSH_S", "0.5")  # inherited by the points
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, args)  # in-process; each point is still its own process
    assert first.exit_code == 1, first.output
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in result["points"]] == ["FINISHED", "FINISHED", "FAILED"]
    assert "not divisible" in result["points"][2]["error"]

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.run_name == "tiny" and parent.info.status == "FAILED"
    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], "tags.`mlflow.parentRunId` = "
        f"'{parent.info.run_id}'")}
    assert set(children) == {"dropout=0", "dropout=0.1", "n_head=3"}
    ok = children["dropout=0.1"]
    assert ok.info.status == "FINISHED"
    assert ok.data.tags["tinytale.sweep"] == "tiny"
    assert json.loads(ok.data.tags["tinytale.overrides"]) == {"model.dropout": 0.1}
    assert ok.data.params["model.dropout"] == "0.1"
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "val_loss")] == [1, 2]
    assert children["n_head=3"].info.status == "FAILED"

    # Again: finished points are skipped, the failed one is tried (and fails) again.
    second = runner.invoke(app, args)
    assert second.exit_code == 1, second.output
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in again["points"]] == ["SKIPPED", "SKIPPED", "FAILED"]
    assert again["parent_run_id"] == result["parent_run_id"]
    assert again["points"][0]["run_id"] == result["points"][0]["run_id"]

    # An edited base file changes every point's config: finished points run again.
    base.write_text("tracking:\n  experiment: sweep-e2e\n  register: false\n"
                    "train:\n  seed: 7\n")
    third = runner.invoke(app, args)
    assert third.exit_code == 1, third.output
    rerun = json.loads(third.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in rerun["points"]] == ["FINISHED", "FINISHED", "FAILED"]
    assert rerun["points"][0]["run_id"] != result["points"][0]["run_id"]
    assert "with another config" in third.stderr
    # ... once: the new runs now stand for those points.
    fourth = runner.invoke(app, args)
    skipped = json.loads(fourth.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in skipped["points"]] == ["SKIPPED", "SKIPPED", "FAILED"]
    assert skipped["points"][0]["run_id"] == rerun["points"][0]["run_id"]
    base.write_text("tracking:\n  experiment: sweep-e2e\n  register: false\n")

    # Compare the sweep: the finished points have curves, the failed ones none.
    out = tmp_path / "tiny.png"
    compared = runner.invoke(app, ["compare", "--sweep", "tiny", "--tracking-uri",
                                   mlflow_server.url, "--out", str(out), "--json"])
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.stdout)
    by_name = {r["run_name"]: r for r in rows}
    assert by_name["dropout=0.1"]["best_epoch"] in (1, 2)
    assert by_name["n_head=3"]["best_epoch"] is None
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "compare")] == \
        ["compare/tiny.png"]


def test_a_point_failing_at_run_time_and_rerun(mlflow_server, tmp_path, tiny_overrides,
                                               monkeypatch):
    """A point whose process starts, then fails (its weights overflow at the first step, so
    the loss of the second is NaN) is FAILED, the sweep goes on, the exit code counts it;
    `--rerun` trains every point again from scratch, as new runs under the same parent."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "tiny.yaml").write_text(
        "tracking:\n  experiment: sweep-rerun\n  register: false\n")
    sweep = write(tmp_path, {
        "name": "again", "base": "tiny.yaml",
        "set": {k: yaml.safe_load(v) for k, v in (o.split("=") for o in tiny_overrides)}
        | {"train.epochs": 2, "data.n_stories": 60, "tracking.samples": 0,
           "train.num_threads": 1, "train.warmup_steps": 0},
        # AdamW scales each decayed matrix by (1 - lr * weight_decay) per step, about -3e297
        # here, past float32's 3.4e38: after step 1 every such weight is +-inf on any CPU and
        # step 2's loss is NaN. (lr=10 without clipping only diverges, and stays finite on
        # AVX-512; lr is capped at 10, weight_decay is not.)
        "points": [{"train.weight_decay": 1e300}, {"model.dropout": 0.1}],
    })
    args = ["sweep", str(sweep), "--tracking-uri", mlflow_server.url,
            "--out", str(tmp_path / "runs"), "--json"]
    monkeypatch.setenv("TINYTALE_TRACKING_FLUSH_S", "0.5")
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, args)
    assert first.exit_code == 1, first.output
    result = json.loads(first.stdout.strip().splitlines()[-1])
    bad, good = result["points"]
    assert (bad["status"], good["status"]) == ("FAILED", "FINISHED")  # the sweep went on
    assert bad["error"].startswith("run failed: non-finite loss or gradient at step")

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FAILED" and parent.data.metrics["points_failed"] == 1
    failed = client.get_run(bad["run_id"])
    # The point's own run, which it opened and closed FAILED (not a record made by the sweep).
    assert failed.info.status == "FAILED" and \
        failed.data.params["train.weight_decay"] == "1e+300"
    assert failed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert failed.data.tags["tinytale.sweep"] == "again"

    second = runner.invoke(app, [*args, "--rerun"])
    assert second.exit_code == 1, second.output
    rerun = json.loads(second.stdout.strip().splitlines()[-1])
    assert rerun["parent_run_id"] == result["parent_run_id"]
    assert [p["status"] for p in rerun["points"]] == ["FAILED", "FINISHED"]
    # New runs, nothing resumed: the finished point trained its two epochs again.
    assert rerun["points"][0]["run_id"] != bad["run_id"]
    new_id = rerun["points"][1]["run_id"]
    assert new_id != good["run_id"]
    assert [m.step for m in client.get_metric_history(new_id, "val_loss")] == [1, 2]
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                              "attributes.run_name = 'dropout=0.1'")
    assert {r.info.run_id for r in runs} == {good["run_id"], new_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    log = (tmp_path / "runs" / "again" / "logs" / "dropout=0.1.log").read_text()
    assert log.count("\n==== ") == 2  # each attempt keeps its part of the log


def test_stopped_sweep_resumes_its_point_into_the_same_run(mlflow_server, tmp_path,
                                                          tiny_overrides):
    """SIGTERM to the sweep stops its point with a checkpoint; the next sweep resumes it."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "tiny.yaml").write_text(
        "tracking:\n  experiment: sweep-resume\n  register: false\n")
    epochs = 4
    sweep = write(tmp_path, {
        "name": "stopped", "base": "tiny.yaml",
        "set": {k: yaml.safe_load(v) for k, v in (o.split("=") for o in tiny_overrides)}
        | {"train.epochs": epochs, "data.n_stories": 60, "tracking.samples": 0,
           "train.num_threads": 1},
        "points": [{"model.dropout": 0.1}],
    })
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "tinytale", "sweep", str(sweep), "--tracking-uri",
            mlflow_server.url, "--out", str(runs), "--json"]
    env = {**os.environ, "TINYTALE_TRACKING_FLUSH_S": "0.5", "PYTHONPATH": str(REPO)}
    # The point waits in epoch 2 until the signal the sweep passes on has reached it (see
    # tests/support/holding.py), so it cannot finish first however fast this machine trains.
    hold = tmp_path / "hold"
    proc = subprocess.Popen(argv, cwd=tmp_path, env=hold_env(hold, 2, 1, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_held(hold, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    first = json.loads(stdout.strip().splitlines()[-1])["points"][0]
    assert first["status"] == "KILLED", first
    reached = peek_checkpoint(next(runs.rglob("last.pt")))["train_state"]["epoch"]
    assert 2 <= reached < epochs

    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming run" in again.stderr
    point = json.loads(again.stdout.strip().splitlines()[-1])["points"][0]
    assert point["status"] == "FINISHED"

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(point["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["tinytale.sweep"] == "stopped"
    # One run for the point, every epoch logged once across the two processes.
    children = client.search_runs([run.info.experiment_id], "tags.`tinytale.sweep` = 'stopped'")
    assert [r.info.run_id for r in children] == [point["run_id"]]
    steps = [m.step for m in client.get_metric_history(point["run_id"], "val_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))


def test_sweep_against_an_unreachable_server_is_one_sentence(tmp_path, base):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sweep = write(tmp_path, {"name": "s", "base": "base.yaml", "points": [{"model.dropout": 0.1}]})
    result = runner.invoke(app, ["sweep", str(sweep), "--tracking-uri", uri,
                                 "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: cannot reach the MLflow server at {uri}; start it "
                             "(`docker compose up -d mlflow`, or `mlflow server`) or pass its "
                             "address with --tracking-uri.\n")
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(("host", "refusal", "fix"), [
    ("127.0.0.1", "requires a login and none was given (HTTP 401)", "MLFLOW_TRACKING_USERNAME"),
    ("localhost", "refuses the Host header", "allowed hosts"),
])
def test_sweep_refused_by_the_server_is_one_sentence(refusing_server, no_credentials,
                                                     tmp_path, base, host, refusal, fix):
    uri = f"http://{host}:{refusing_server}"
    sweep = write(tmp_path, {"name": "s", "base": "base.yaml", "points": [{"model.dropout": 0.1}]})
    result = runner.invoke(app, ["sweep", str(sweep), "--tracking-uri", uri,
                                 "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: MLflow at {uri} {refusal}")
    assert result.stderr.count("\n") == 1 and fix in result.stderr


def test_bad_sweep_file_exits_2(tmp_path):
    result = tinytale("sweep", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep file")
