"""A lesson run tells its story in MLflow: samples per epoch, reference levels, the corpus as
dataset inputs, the model's own metrics and input example, a description. Against a real
server that goes away mid-run, and again after a replay that lost its acknowledgements:
every record arrives exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from support.configs import TINY
from support.holding import hold_env, release, wait_held
from support.spool import spool_records
from test_outage import sync

from tinytale.mlflow_tracker import SPOOL_NAME

EPOCHS = 6
SAMPLE_EVERY = 2
SAMPLED_EPOCHS = [1, 2, 4, 6]  # epoch 1 and every 2nd
# The lesson's model on the lesson corpus, short: it beats the bigram level by epoch ~3.
LESSON_SHORT = [f"train.epochs={EPOCHS}", f"tracking.sample_every_epochs={SAMPLE_EVERY}",
                "tracking.system_metrics=false", "tracking.samples=1",
                "tracking.log_every_steps=5"]


def start_lesson(url: str, out: Path, env: dict[str, str]) -> subprocess.Popen:
    env = {**env, "TINYTALE_TRACKING_WAIT_S": "120", "TINYTALE_TRACKING_FLUSH_S": "0.3"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [a for o in LESSON_SHORT for a in ("--set", o)]
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("tinytale")), "train", *sets, "--tracking-uri",
         url, "--out", str(out), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def samples_table(client: MlflowClient, run_id: str, tmp: Path) -> dict:
    path = client.download_artifacts(run_id, "samples.json", str(tmp))
    return json.loads(Path(path).read_text())


def check_story(client: MlflowClient, run_id: str, summary: dict, tmp: Path) -> None:
    """Everything the run must show, each exactly once."""
    run = client.get_run(run_id)
    # Samples: one row per sampled epoch and prompt, as an MLflow table.
    table = samples_table(client, run_id, tmp)
    cols = table["columns"]
    keys = [(row[cols.index("epoch")], row[cols.index("sample")]) for row in table["data"]]
    assert sorted(keys) == [(e, s) for e in SAMPLED_EPOCHS for s in (0, 1)], keys
    assert {"text", "prompt", "temperature", "seed", "val_loss"} <= set(cols)
    assert {"path": "samples.json", "type": "table"} in json.loads(
        run.data.tags["mlflow.loggedArtifacts"])

    # Reference levels: params of the run; the summary says when val loss beat them.
    levels = summary["reference_losses"]
    for level in ("uniform", "unigram", "bigram"):
        assert float(run.data.params[f"reference.{level}_loss"]) == levels[level]
    assert levels["bigram"] < levels["unigram"] < levels["uniform"]
    assert summary["beat_unigram_epoch"] is not None and summary["beat_bigram_epoch"] is not None
    assert summary["beat_unigram_epoch"] <= summary["beat_bigram_epoch"] <= EPOCHS
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert val[summary["beat_bigram_epoch"]] < levels["bigram"]
    assert all(val[e] >= levels["bigram"] for e in range(1, summary["beat_bigram_epoch"]))

    # The corpus: two dataset inputs with the corpus digest, contexts and a profile.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["lesson.train", "lesson.val"]
    digests = {d.dataset.digest for d in inputs.values()}
    assert len(digests) == 1 and len(digests.pop()) == 32
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                for name, d in inputs.items()}
    assert contexts == {"lesson.train": "training", "lesson.val": "validation"}
    profile = json.loads(inputs["lesson.train"].dataset.profile)
    assert profile["vocabulary"] == 24 and profile["stories"] == 194
    assert json.loads(inputs["lesson.val"].dataset.source)["split"] == "val"

    # The model: its best epoch's metrics, an input example, no duplicate model.
    model = client.get_logged_model(summary["model_id"])
    model_metrics = {(m.key, m.step): m.value for m in model.metrics}
    assert model_metrics[("val_loss", summary["best_epoch"])] == summary["best_val_loss"]
    assert ("val_perplexity", summary["best_epoch"]) in model_metrics
    files = {f.path for f in client.list_logged_model_artifacts(summary["model_id"])}
    assert {"input_example.json", "serving_input_example.json"} <= files
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.model_id for m in models if m.source_run_id == run_id] == [summary["model_id"]]

    # One x-axis (README: "One x-axis"): per-step points have step = optimizer step, per-epoch
    # ones step = epoch, and their timestamps order them, so "Time (relative)" lines them up:
    # every step point lies between the validation of the epoch before and of its own epoch.
    val_at = {m.step: m.timestamp for m in client.get_metric_history(run_id, "val_loss")}
    step_points = client.get_metric_history(run_id, "train_loss_step")
    steps_per_epoch = int(run.data.params["train_windows"]) // 16  # the lesson's batch size
    assert len(step_points) == EPOCHS * steps_per_epoch // 5
    for point in step_points:
        epoch = -(-point.step // steps_per_epoch)  # the epoch this optimizer step belongs to
        assert val_at.get(epoch - 1, 0) <= point.timestamp <= val_at[epoch], (point, epoch)

    # The description names the experiment and the overrides.
    note = run.data.tags["mlflow.note.content"]
    assert "built-in lesson" in note and "`train.epochs=6`" in note


def test_lesson_story_survives_an_outage_exactly_once(fresh_mlflow_server, tmp_path):
    server = fresh_mlflow_server
    hold = tmp_path / "hold"
    # Held at the start of epoch 3: epochs 1 and 2 (two sampled) are spooled and sent.
    proc = start_lesson(server.url, tmp_path / "runs", hold_env(hold, 3, 1))
    try:
        wait_held(hold, proc)
        spool = next((tmp_path / "runs").rglob(SPOOL_NAME))
        deadline = time.monotonic() + 120
        while True:  # until the samples of epoch 2 are on the server
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "epoch 2's samples never reached the server"
            recs = spool_records(spool)
            acked = max((r["upto"] for r in recs if r.get("op") == "ack"), default=0)
            seqs = [r["seq"] for r in recs if r.get("op") == "samples" and r["epoch"] == 2]
            if seqs and acked >= seqs[0]:
                break
            time.sleep(0.05)
        server.stop()
        release(hold)
        deadline = time.monotonic() + 120
        while not any(r.get("op") == "samples" and r["epoch"] == 4
                      for r in spool_records(spool)):  # sampled while the server is away
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training stopped while the server was down"
            time.sleep(0.1)
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["registered_version"] == "1", (summary, err[-2000:])
    # The console showed a sample line at each sampled epoch.
    shown = [int(line.split()[3].rstrip(":")) for line in err.splitlines()
             if line.startswith("sample @ epoch ")]
    assert shown == SAMPLED_EPOCHS, err[-3000:]
    client = MlflowClient(server.url)
    check_story(client, summary["run_id"], summary, tmp_path / "first")

    # Lost acknowledgements: the whole spool is sent again; nothing is doubled.
    run_dir = Path(summary["run_dir"])
    kept = [line for line in (run_dir / SPOOL_NAME).read_text().splitlines()
            if json.loads(line).get("op") not in ("ack", "run", "registered")]
    (run_dir / SPOOL_NAME).write_text("\n".join(kept) + "\n")
    replay = sync(str(run_dir), "--tracking-uri", server.url)
    assert replay["run_id"] == summary["run_id"] and replay["metrics_sent"] == 0
    assert replay["model_id"] == summary["model_id"]
    check_story(client, summary["run_id"], summary, tmp_path / "again")


def test_compare_reports_and_draws_the_levels(mlflow_server, tmp_path):
    """`tinytale compare` on a lesson run: beat epochs in --json, the levels in the figure."""
    env = {**os.environ}
    proc = start_lesson(mlflow_server.url, tmp_path / "runs", env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    exe = str(Path(sys.executable).with_name("tinytale"))
    compared = subprocess.run(
        [exe, "compare", summary["run_id"], "--tracking-uri", mlflow_server.url, "--json",
         "--svg", "--out", str(tmp_path / "curves.png")],
        capture_output=True, text=True, timeout=240, env={**env, "MLFLOW_TRACKING_URI": ""})
    assert compared.returncode == 0, compared.stderr
    row = json.loads(compared.stdout)[0]
    assert row["beat_unigram_epoch"] == summary["beat_unigram_epoch"]
    assert row["beat_bigram_epoch"] == summary["beat_bigram_epoch"]
    assert row["reference_losses"] == summary["reference_losses"]
    svg = (tmp_path / "curves.svg").read_text()
    for level in ("uniform", "unigram", "bigram"):
        assert f"{level} level {summary['reference_losses'][level]:.3f}" in svg


def test_input_example_is_logged_without_loading_the_model(mlflow_server, tmp_path,
                                                           monkeypatch):
    """Logging the best checkpoint writes the example files but never loads the model (which
    MLflow does by default to validate an example: a load and a prediction per run). A record
    of an earlier tinytale names best.pt, and the example prompt is chosen here; a record of
    this one names the training process's model.pt and carries its prompt."""
    import mlflow

    from tinytale.mlflow_tracker.pyfunc import log_and_register

    exe = str(Path(sys.executable).with_name("tinytale"))
    trained = subprocess.run(
        [exe, "train", *[a for o in TINY for a in ("--set", o)], "--no-tracking", "--out",
         str(tmp_path / "runs"), "--json"], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = json.loads(trained.stdout.strip().splitlines()[-1])["checkpoint"]
    loads = []
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: loads.append(a))
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"example-{time.monotonic_ns()}")
    run_id = client.create_run(experiment_id).info.run_id
    from tinytale.checkpoint import load_checkpoint, save_model_copy

    def logged(seq: int, **fields) -> Path:
        """The model folder that log_and_register made of a model record with `fields`."""
        rec = {"seq": seq, "local_id": "example", "register": False,
               "registered_model": "unused", "summary": {"best_epoch": 3}, **fields}
        done = log_and_register(client, mlflow_server.url, run_id, experiment_id, rec)
        return Path(mlflow.artifacts.download_artifacts(
            f"models:/{done['model_id']}", dst_path=str(tmp_path / f"model{seq}"),
            tracking_uri=mlflow_server.url))

    folder = logged(1, checkpoint=checkpoint)
    serving = json.loads((folder / "serving_input_example.json").read_text())
    assert serving["inputs"] == ["once upon a time"] and serving["params"]["seed"] == 1

    model_file = tmp_path / "model.pt"
    save_model_copy(checkpoint, model_file)
    # The prompt as for a corpus whose words the lesson's opening lacks.
    folder = logged(2, checkpoint=str(model_file), model_file=True, example_prompt="")
    serving = json.loads((folder / "serving_input_example.json").read_text())
    assert serving["inputs"] == [""]
    assert loads == []
    assert not {"optimizer", "rng"} & load_checkpoint(folder / "artifacts/model.pt").keys()
