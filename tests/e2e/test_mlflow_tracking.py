"""What a tracked run logs, checked through MlflowClient against a real server and the
embedded SQLite default: params, tags, one value per epoch per metric, artifacts, resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tinytale.cli import app

EPOCH_METRICS = ("train_loss", "val_loss", "val_perplexity", "train_perplexity", "lr",
                 "tokens_per_sec", "epoch_time_s", "grad_norm", "generalization_gap")


def train(args: list[str], env: dict[str, str | None] | None = None) -> dict:
    """`tinytale train ... --json` in this process; returns the JSON summary."""
    result = CliRunner().invoke(app, ["train", *args, "--json"], env=env)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def server_run(mlflow_server, tmp_path_factory):
    """One tiny run against the server, with step-level logging on."""
    from support.configs import TINY

    name = uuid.uuid4().hex[:8]
    out = tmp_path_factory.mktemp("tracked")
    summary = train([*sets(TINY), "--set", "tracking.log_every_steps=2", "--set",
                     f"tracking.registered_model=track-{name}", "--experiment",
                     f"track-{name}", "--run-name", "tiny", "--tracking-uri", mlflow_server.url,
                     "--out", str(out)])
    return summary, MlflowClient(mlflow_server.url), f"track-{name}"


def test_params_tags_and_experiment_kind(server_run):
    summary, client, experiment = server_run
    run = client.get_run(summary["run_id"])
    params = run.data.params
    assert params["model.n_layer"] == "1"
    assert params["train.epochs"] == "3"
    assert params["tracking.log_every_steps"] == "2"
    assert params["data.corpus"] == "lesson"
    tags = run.data.tags
    for key in ("config_hash", "corpus", "tokenizer", "device", "torch.version",
                "tinytale.version"):
        assert tags[key], key
    assert run.info.run_name == "tiny"
    assert run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == experiment
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_one_value_per_epoch_per_metric(server_run):
    summary, client, _ = server_run
    run_id = summary["run_id"]
    for key in EPOCH_METRICS:
        assert steps_of(client, run_id, key) == [1, 2, 3], key
    gap = {m.step: m.value for m in client.get_metric_history(run_id, "generalization_gap")}
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    train_ = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert gap[2] == pytest.approx(val[2] - train_[2])
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    # The run's summary numbers are tags: charts are for per-epoch curves only.
    assert float(tags["tinytale.best_val_loss"]) == pytest.approx(summary["best_val_loss"])
    assert int(tags["tinytale.best_epoch"]) == summary["best_epoch"]
    assert tags["tinytale.epochs"] == "3"
    assert not {"best_val_loss", "best_epoch", "epochs"} & set(metrics), sorted(metrics)
    # step-level metrics every 2 optimizer steps, each step once
    steps = steps_of(client, run_id, "train_loss_step")
    assert steps and all(s % 2 == 0 for s in steps) and len(steps) == len(set(steps))
    assert steps_of(client, run_id, "lr_step") == steps
    assert any(k.startswith("system/") for k in metrics), sorted(metrics)


def test_summary_reports_what_tracking_cost(server_run):
    """The loop's time in tracker calls and the tracker threads' CPU time, both measured
    (bench/tracking_overhead.py turns them into a share of train_time_s)."""
    summary = server_run[0]
    assert 0 < summary["tracking_loop_s"] < summary["train_time_s"]
    assert 0 < summary["tracking_threads_cpu_s"] < summary["train_time_s"]


def test_artifacts_config_and_samples(server_run):
    summary, client, _ = server_run
    names = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.yaml", "samples.txt"} <= names
    local = client.download_artifacts(summary["run_id"], "config.yaml")
    assert "n_layer: 1" in Path(local).read_text()


def test_register_false_and_nesting_under_a_parent(mlflow_server, tiny_overrides, tmp_path):
    """tracking.register=false logs the model without a version; sweeps nest their points."""
    name = f"noreg-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, run_name="sweep").info.run_id
    summary = train([*sets(tiny_overrides), "--set", "train.epochs=1", "--set",
                     "tracking.register=false", "--set", f"tracking.registered_model={name}",
                     "--set", "tracking.system_metrics=false", "--experiment", name,
                     "--tracking-uri", mlflow_server.url, "--out", str(tmp_path)],
                    env={"TINYTALE_PARENT_RUN_ID": parent})
    assert summary["model_uri"].startswith("models:/m-")
    assert summary.get("registered_version") is None
    assert client.search_registered_models(f"name = '{name}'") == []
    assert client.get_run(summary["run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_invalid_tracking_uri_is_one_sentence(tiny_overrides, tmp_path):
    result = CliRunner().invoke(app, ["train", *sets(tiny_overrides), "--tracking-uri",
                                      "htp:/nowhere", "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tracking URI" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # failed before training


class StopAfter:
    """A StopRequest that trips after `n` optimizer steps (what SIGTERM would do)."""

    def __init__(self, n: int):
        self.n, self.reason = n, None

    def request(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        self.n -= 1
        if self.n < 0:
            self.reason = "SIGTERM"
        return self.reason is not None


def test_resume_continues_the_same_run(mlflow_server, tiny_overrides, tmp_path):
    from tinytale.cli import build_tracker
    from tinytale.config import load_config
    from tinytale.run import train_run

    name = f"resume-{uuid.uuid4().hex[:8]}"
    overrides = [*tiny_overrides, "train.epochs=3", f"tracking.experiment={name}",
                 "tracking.system_metrics=false", f"tracking.registered_model={name}"]
    cfg = load_config(None, overrides)
    tracker = build_tracker(cfg, mlflow_server.url, no_tracking=False, quiet=True)
    # Stop in the middle of epoch 2 (the tiny lesson has 58 steps per epoch).
    first = train_run(cfg, tmp_path, tracker, stop=StopAfter(80))
    assert first.fit.status == "KILLED"
    run_id = first.summary.run_id
    assert run_id
    summary = train(["--resume", "auto", "--set", f"tracking.experiment={name}",
                     "--tracking-uri", mlflow_server.url, "--out", str(tmp_path)])
    assert summary["run_id"] == run_id
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    for key in ("train_loss", "val_loss"):
        assert steps_of(client, run_id, key) == [1, 2, 3], key
    assert "tinytale.event.resumed" in runs[0].data.tags


def test_embedded_default_store(tiny_overrides, tmp_path, monkeypatch):
    """No URI: ./mlflow.db and ./mlartifacts in the working directory, model registered."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = train([*sets(tiny_overrides), "--set", "train.epochs=2", "--out", "runs"],
                    env={"MLFLOW_TRACKING_URI": None})
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "tinytale"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert run.data.params["model.n_embd"] == "16" and run.data.params["train.epochs"] == "2"
    for key in EPOCH_METRICS:
        assert steps_of(client, run.info.run_id, key) == [1, 2], key
    assert {"config.yaml", "samples.txt"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}
    champion = client.get_model_version_by_alias("tinytale", "champion")
    assert str(champion.version) == summary["registered_version"]
    assert champion.tags["run_id"] == run.info.run_id
    assert champion.tags["best_epoch"] == str(summary["best_epoch"])
    # The logged model lives with its run: its experiment, under ./mlartifacts, no ./mlruns.
    logged = client.get_logged_model(summary["model_id"])
    assert logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()

    # A worse run (one epoch) gets version 2; champion stays on version 1.
    worse = train([*sets(tiny_overrides), "--set", "train.epochs=1", "--out", "runs"],
                  env={"MLFLOW_TRACKING_URI": None})
    assert worse["registered_version"] == "2" and worse["champion"] is False
    assert client.get_model_version_by_alias("tinytale", "champion").version == \
        champion.version

    # Any MLflow client in a fresh process loads the champion from the embedded store.
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/tinytale@champion'); "
            "print(m.predict(['once upon a time'], params={'max_new_tokens': 4, 'seed': 1})[0])")
    loaded = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'mlflow.db'}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.startswith("once upon a time")
    # generate from the registry with no URI: the same embedded store
    result = CliRunner().invoke(app, ["generate", "models:/tinytale@champion", "--prompt",
                                      "once upon a time", "--max-new-tokens", "5",
                                      "--seed", "1"], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("once upon a time")
    listing = CliRunner().invoke(app, ["runs", "--json"], env={"MLFLOW_TRACKING_URI": None})
    assert listing.exit_code == 0, listing.stderr
    rows = json.loads(listing.stdout)
    first = next(r for r in rows if r["run_id"] == summary["run_id"])
    assert first["epochs"] == 2 and first["registered_version"] == "1"


def test_a_new_embedded_store_starts_from_an_empty_copy(tiny_overrides, tmp_path, monkeypatch):
    """The first store a training creates leaves an empty copy in the user's cache (no
    experiment, no run); the next new store starts from it instead of MLflow's migrations,
    gets a Default experiment naming its own folder, and takes a run and a model as usual.
    A damaged copy is not used, and is replaced."""
    import sqlite3

    import mlflow

    from tinytale.mlflow_tracker.store_seed import keep_seed, seed_store

    cache = tmp_path / "cache"
    seed = cache / "tinytale" / f"mlflow-{mlflow.__version__}-empty.db"
    env = {"MLFLOW_TRACKING_URI": None, "XDG_CACHE_HOME": str(cache)}
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # for seed_store/keep_seed below

    def counts(db: Path) -> tuple[int, int]:
        with sqlite3.connect(db) as c:
            return (c.execute("SELECT count(*) FROM experiments").fetchone()[0],
                    c.execute("SELECT count(*) FROM alembic_version").fetchone()[0])

    summaries = {}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        summaries[name] = train([*sets(tiny_overrides), "--set", "train.epochs=1", "--out",
                                 "runs"], env=env)
        assert seed.is_file() and counts(seed) == (0, 1)  # kept by the first, unchanged
    second = tmp_path / "second"
    client = MlflowClient(f"sqlite:///{second / 'mlflow.db'}")
    default = client.get_experiment("0")
    assert default.name == "Default" and str(second) in default.artifact_location
    run = client.get_run(summaries["second"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "tinytale"
    assert steps_of(client, run.info.run_id, "val_loss") == [1]
    assert summaries["second"]["registered_version"] == "1"

    # Seeding itself: a byte copy of the kept store, never over an existing one.
    third = tmp_path / "third.db"
    assert seed_store(third) and third.read_bytes() == seed.read_bytes()
    assert not seed_store(third)
    seed.write_bytes(b"not a database")  # damaged: MLflow creates the store, as without
    assert not seed_store(tmp_path / "fourth.db")
    assert not (tmp_path / "fourth.db").exists()
    keep_seed(second / "mlflow.db")  # a store with runs in it is not kept ...
    assert seed.read_bytes() == b"not a database"
    MlflowClient(f"sqlite:///{tmp_path / 'fresh.db'}").search_experiments()
    keep_seed(tmp_path / "fresh.db")  # ... an empty one is, over the damaged copy
    assert counts(seed) == (0, 1)


def test_model_saving_is_warmed_before_the_registration():
    """The helper computes MLflow's installed-package map (read when a model's requirements are
    checked) while the training runs, without importing torch (about 1 s of its CPU: the
    training process writes the model file). Should MLflow rename what it keeps, this fails
    and says the warm-up no longer saves the registration its ~0.3 s."""
    code = ("import sys\n"
            "from mlflow.utils import requirements_utils as r\n"
            "from tinytale.mlflow_tracker.pyfunc import warm_model_saving\n"
            "assert not r._PACKAGES_TO_MODULES and 'torch' not in sys.modules\n"
            "warm_model_saving()\n"
            "assert r._PACKAGES_TO_MODULES and 'torch' in r._PACKAGES_TO_MODULES\n"
            "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
