"""A new user's first hour: host commands that find the stack's server, links into the MLflow
UI, a diverged run flagged, huge perplexities printed as numbers a person can read."""

from __future__ import annotations

import io
import json
import math
import urllib.parse

import pytest
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.launch import read_back_commands
from tinytale.metrics import perplexity
from tinytale.mlflow_tracker.uris import run_url, sweep_charts_url
from tinytale.sweep.runner import PointResult, SweepResult, render_results
from tinytale.tracking import ConsoleTracker
from tinytale.train import diverged

runner = CliRunner()

READ_ONLY = [
    ["runs"],
    ["compare", "--sweep", "regularization"],
    ["generate", "models:/tinytale@champion"],
    ["generate", "0123456789abcdef0123456789abcdef"],
]


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    """A folder nothing was trained in, no tracking URI in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(a[:2]))
def test_read_only_commands_create_no_store(fresh_folder, monkeypatch, args):
    monkeypatch.setenv("TINYTALE_MLFLOW_PORT", "9")  # nothing answers on the discard port
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    db = fresh_folder / "mlflow.db"
    assert result.stderr.startswith(f"error: there is no MLflow store at {db} "), result.stderr
    assert "--tracking-uri" in result.stderr and result.stderr.count("\n") == 1
    assert list(fresh_folder.iterdir()) == [], "a read-only command left files behind"


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(a[:2]))
def test_read_only_commands_point_at_the_stacks_server(fresh_folder, monkeypatch,
                                                       mlflow_server, args):
    """After `docker compose up` the runs are on the server: the error says how to read it."""
    monkeypatch.setenv("TINYTALE_MLFLOW_PORT", str(mlflow_server.port))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert (f"an MLflow server answers on {mlflow_server.url} (the compose stack's port): "
            f"pass --tracking-uri {mlflow_server.url} or export "
            f"MLFLOW_TRACKING_URI={mlflow_server.url}.") in result.stderr
    assert list(fresh_folder.iterdir()) == []


def test_a_sweep_missing_from_a_server_names_the_store_searched(fresh_folder, mlflow_server):
    result = runner.invoke(app, ["compare", "--sweep", "no-such-sweep", "--tracking-uri",
                                 mlflow_server.url])
    assert result.exit_code == 2, result.output
    assert f"(searched {mlflow_server.url})" in result.stderr


def test_train_prints_its_run_page_in_model_training_mode(fresh_folder, mlflow_server,
                                                          tiny_overrides):
    args = [a for item in tiny_overrides for a in ("--set", item)]
    result = runner.invoke(app, ["train", *args, "--set", "train.epochs=1", "--tracking-uri",
                                 mlflow_server.url, "--out", str(fresh_folder / "runs"),
                                 "--experiment", "first-hour", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    url = summary["run_url"]
    assert url.startswith(f"{mlflow_server.url}/#/experiments/")
    assert f"/runs/{summary['run_id']}/model-metrics?workflowType=machine_learning" in url
    assert f"mlflow run: {url}" in result.stderr  # at the start, to watch it train
    assert summary["diverged"] is False


def test_a_container_prints_links_a_host_browser_opens(monkeypatch):
    monkeypatch.setenv("TINYTALE_MLFLOW_UI_URL", "http://127.0.0.1:5001")
    url = run_url("http://mlflow:5000", "3", "abc")
    assert url == ("http://127.0.0.1:5001/#/experiments/3/runs/abc/model-metrics"
                   "?workflowType=machine_learning")


def test_local_stores_have_no_ui_links():
    assert run_url("sqlite:////tmp/mlflow.db", "1", "abc") is None
    assert sweep_charts_url("sqlite:////tmp/mlflow.db", "1", "reg") is None


def test_the_sweep_chart_link_lists_the_points_flat():
    url = sweep_charts_url("http://127.0.0.1:5000", "2", "regularization")
    query = dict(urllib.parse.parse_qsl(url.split("?", 1)[1]))
    assert query["workflowType"] == "machine_learning"
    assert query["searchFilter"] == 'tags.`tinytale.sweep` = "regularization"'
    # sorted by a metric, the UI lists child runs flat instead of folded under the parent
    assert query["orderByKey"] == "metrics.`val_loss`" and query["compareRunsMode"] == "CHART"


def test_a_launched_run_ends_with_the_host_commands_that_read_it(monkeypatch):
    monkeypatch.setenv("TINYTALE_MLFLOW_PORT", "5005")
    lines = read_back_commands("overfitting", "tales")
    text = "\n".join(lines)
    assert "tinytale runs --experiment overfitting --tracking-uri http://127.0.0.1:5005" in text
    assert "tinytale generate models:/tales@champion --tracking-uri http://127.0.0.1:5005" in text
    assert "http://127.0.0.1:5005/#/experiments?workflowType=machine_learning" in text


def test_a_sweep_table_flags_a_diverged_point_and_says_how_to_read_it():
    result = SweepResult("reg", "overfitting", "p" * 32, [
        PointResult(1, "lr=10", {"train.lr": 10}, "FINISHED", "r" * 32, 1, 14.5, 3.0,
                    diverged=True),
        PointResult(2, "lr=1e-3", {"train.lr": 1e-3}, "FINISHED", "s" * 32, 9, 0.5, 3.0),
    ], tracking_uri="http://127.0.0.1:5000", experiment_id="4")
    text = render_results(result)
    assert "FINISHED (diverged)" in text.splitlines()[2]
    assert "(diverged)" not in text.splitlines()[3]
    assert "tinytale compare --sweep reg --tracking-uri http://127.0.0.1:5000" in text
    assert "http://127.0.0.1:5000/#/experiments/4/runs/" + "p" * 32 in text


@pytest.mark.parametrize(("train_loss", "val_loss", "expected"), [
    (0.3, 0.4, False),          # learned
    (0.05, 3.0, False),         # overfit badly, still near guessing (ln 24 = 3.18)
    (3.2, 3.2, False),          # learned nothing
    (3.0, 6.5, True),           # val above 2 ln 24 = 6.36
    (4600.0, 4023.0, True),     # blown up by the learning rate
    (0.3, math.inf, True),
    (math.nan, 0.4, True),
    (None, None, False),        # no epoch finished
])
def test_diverged_means_far_above_guessing(train_loss, val_loss, expected):
    assert diverged(train_loss, val_loss, 24) is expected


def test_perplexity_is_inf_past_float32_and_printed_readably():
    assert perplexity(88.0) == pytest.approx(math.exp(88.0))
    assert perplexity(460.0) == math.inf
    out = io.StringIO()
    console = ConsoleTracker(out, progress=False)
    console.log_metrics({"train_loss": 4600.0, "val_loss": 60.0, "val_perplexity": math.exp(60),
                         "lr": 1.0, "tokens_per_sec": 1e4, "epoch_time_s": 0.1}, step=1)
    console.log_metrics({"train_loss": 4600.0, "val_loss": 460.0,
                         "val_perplexity": perplexity(460.0), "lr": 1.0, "tokens_per_sec": 1e4,
                         "epoch_time_s": 0.1}, step=2)
    header, first, second = out.getvalue().splitlines()
    assert len(first) == len(second) == len(header), out.getvalue()
    assert "1.14e+26" in first and "4.6e+03" in first
    assert second.split()[3] == "inf"


def test_a_warning_event_is_one_line_for_a_person():
    out = io.StringIO()
    ConsoleTracker(out, progress=False).on_event("diverged", {"final_val_loss": 14.5,
                                                              "message": "the run diverged"})
    assert out.getvalue() == "warning: the run diverged\n"


@pytest.mark.parametrize(("host", "refusal"), [
    ("127.0.0.1", "requires a login and none was given (HTTP 401)"),
    ("localhost", "refuses the Host header"),
])
@pytest.mark.parametrize("args", [["runs"], ["generate", "models:/tinytale@champion"],
                                  ["generate", "0123456789abcdef0123456789abcdef"]],
                         ids=lambda a: " ".join(a[:2]))
def test_read_commands_refused_by_the_server_are_one_sentence(refusing_server, no_credentials,
                                                              fresh_folder, host, refusal, args):
    """A 401/403 is the server refusing us, not a missing run or model, and no traceback."""
    uri = f"http://{host}:{refusing_server}"
    result = runner.invoke(app, [*args, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: MLflow at {uri} {refusal}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
