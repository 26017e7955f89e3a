"""Start-up: help and mistakes in the input are answered without loading torch or mlflow, and
a run into the embedded store never imports mlflow (or torch._dynamo) in the training process.

Each case runs the CLI in a fresh interpreter and reads its `sys.modules` at exit; how fast
that is is measured in bench/run.py (lesson), never here.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
from support.configs import REPO, TINY

PROBE = """
import json, sys
from tinytale.cli import app
try:
    app(sys.argv[1:], prog_name="tinytale")
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "torch._dynamo", "mlflow") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def run_cli(args: list[str], cwd) -> tuple[dict, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    probe = json.loads(proc.stderr.strip().splitlines()[-1])
    return probe, proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [
    ["--help"],
    ["train", "--help"],
    ["generate", "--help"],
], ids=["help", "train-help", "generate-help"])
def test_help_loads_neither_torch_nor_mlflow(tmp_path, args):
    probe, stdout, _ = run_cli(args, tmp_path)
    assert probe == {"code": 0, "heavy": []}
    assert "Usage" in stdout


@pytest.mark.parametrize(("args", "says"), [
    (["train", "--set", "train.lr=fast"], "train.lr='fast' is not a number"),
    (["train", "--set", "train.precision=fp16"], "train.precision='fp16' is not one of"),
    (["train", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["train", "--out", "a-file"], "--out 'a-file'"),
    (["train", "--tracking-uri", "nosuch://x"], "nosuch://x"),
], ids=["bad-value", "bad-precision", "missing-file", "out-is-a-file", "bad-tracking-uri"])
def test_input_mistakes_exit_2_before_loading_torch_or_mlflow(tmp_path, args, says):
    (tmp_path / "a-file").write_text("not a folder")
    probe, _, stderr = run_cli(args, tmp_path)
    assert probe == {"code": 2, "heavy": []}, stderr
    assert says in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written


def test_a_tracked_run_into_the_embedded_store_leaves_mlflow_to_a_helper(tmp_path):
    """The training process trains, registers and ends the run without importing mlflow, or
    torch._dynamo: nothing is compiled on a CPU, and the optimizer is EagerAdamW."""
    probe, stdout, stderr = run_cli(["train", *sum((["--set", s] for s in TINY), []),
                                     "--json", "--out", "runs"], tmp_path)
    assert probe == {"code": 0, "heavy": ["torch"]}, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["run_id"]
    assert summary["registered_version"] == "1"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == summary["epochs"] == 3
    assert run.data.tags["precision"] == "fp32"


def test_ctrl_c_at_the_terminal_still_ends_the_run_through_the_helper(tmp_path):
    """SIGINT to the whole foreground process group, as a terminal sends it: the training
    checkpoints and stops, and the helper (in its own session) still closes the run KILLED."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = sum((["--set", s] for s in [*TINY, "train.epochs=500"]), [])
    proc = subprocess.Popen([sys.executable, "-m", "tinytale", "train", *overrides, "--json",
                             "--out", "runs"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first epoch row: training is under way
        if line.split()[:1] == ["1"]:
            break
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["run_id"])
    assert run.info.status == "KILLED"


UNPICKLE = """
import pickle, sys
for message in pickle.load(sys.stdin.buffer):
    pickle.loads(message)
print("torch" in sys.modules)
"""


def test_what_the_training_sends_the_helper_reads_without_torch(tmp_path):
    """Every message to the MLflow helper unpickles without importing torch. One torch object
    in one (the torch.version tag was a TorchVersion) made the helper import torch, about 1 s
    of its CPU, before it could open the run."""
    from tinytale.config import load_config
    from tinytale.mlflow_tracker.process import TrackerProcess
    from tinytale.run import train_run

    sent = []

    class Recording(TrackerProcess):
        def _post(self, message):
            if message is not None:
                sent.append(pickle.dumps(message))
            super()._post(message)

    config = load_config(None, TINY)
    outcome = train_run(config, tmp_path / "runs",
                        Recording(config, f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert outcome.summary.registration.version == "1"
    names = {pickle.loads(m)[1] for m in sent if pickle.loads(m)[0] != "init"}
    assert {"start", "log_metrics", "publish_model", "finish"} <= names
    proc = subprocess.run([sys.executable, "-c", UNPICKLE], input=pickle.dumps(sent),
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "False"


# Loaded by every interpreter whose path holds it: notes which process first imports torch.
WATCH_TORCH = """
import os, sys
def _hook(event, args):
    if event == "import" and args[0] == "torch":
        who = "helper" if "mlflow_tracker" in (sys.argv[0] if sys.argv else "") else "other"
        open(os.path.join(os.environ["TORCH_IMPORTS"], f"{who}-{os.getpid()}"), "w").close()
sys.addaudithook(_hook)
"""


def test_the_helper_logs_and_registers_the_model_without_torch(tmp_path):
    """The training process writes model.pt (best.pt without its AdamW moments) and picks the
    example prompt, so the MLflow helper never imports torch: about 1 s of its CPU, which
    held back everything queued behind it, the registration included."""
    hook, seen = tmp_path / "hook", tmp_path / "imports"
    hook.mkdir()
    seen.mkdir()
    (hook / "sitecustomize.py").write_text(WATCH_TORCH)
    env = {**os.environ, "TORCH_IMPORTS": str(seen), "PYTHONPATH": os.pathsep.join(
        [str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "tinytale", "train",
                           *sum((["--set", s] for s in TINY), []), "--json", "--out", "runs"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["registered_version"] == "1"
    assert [p.name.split("-")[0] for p in seen.iterdir()] == ["other"]  # the training only
    model_file = tmp_path / summary["run_dir"] / "model.pt"
    from tinytale.checkpoint import load_checkpoint

    assert not {"optimizer", "rng"} & load_checkpoint(model_file).keys()
