"""torchrun with 2 CPU processes (gloo): the same training as one process with the same global
batch, one tracked MLflow run, a one-sentence refusal of sizes that give no step, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.holding import hold_env, wait_held
from support.server import free_port

from tinytale.checkpoint import load_checkpoint
from tinytale.inference import load_model
from tinytale.train import STOP_AGREE_EVERY_STEPS

MODEL = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
         "--set", "model.block_size=16", "--set", "model.bias=false", "--set", "train.epochs=2",
         "--set", "train.warmup_steps=2", "--set", "data.n_stories=80", "--set",
         "train.device=cpu", "--set", "train.num_threads=1"]
COMMON = ["--no-tracking", "--json", *MODEL]

# Each rank runs the real CLI in-process; this only records what torchrun does not report
# (every rank's exit code) and keeps each rank's stdout/stderr apart.
RANK_WRAPPER = """
import os, sys
from tinytale.cli import app
d, r = os.environ["TINYTALE_TEST_RANK_DIR"], os.environ["RANK"]
for fd, name in ((1, "stdout"), (2, "stderr")):
    os.dup2(os.open(f"{d}/rank{r}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
code = 0
try:
    app(prog_name="tinytale")
except SystemExit as exc:
    code = exc.code or 0
with open(f"{d}/rank{r}.exit", "w") as f:
    f.write(str(code))
sys.exit(code)
"""


def torchrun(*args: str, wrapped: Path | None = None) -> list[str]:
    """`torchrun --nproc_per_node 2 -m tinytale ARGS`, or through RANK_WRAPPER."""
    launch = ["--no-python", sys.executable, "-c", RANK_WRAPPER] if wrapped else \
        ["-m", "tinytale"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *launch, *args]


def wrapped_env(rank_dir: Path) -> dict[str, str]:
    rank_dir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TINYTALE_TEST_RANK_DIR": str(rank_dir)}


def rank_outputs(rank_dir: Path) -> dict[int, tuple[str, str, str]]:
    """{rank: (exit code, stdout, stderr)} for every rank that got to record its exit."""
    return {r: tuple((rank_dir / f"rank{r}.{kind}").read_text()
                     for kind in ("exit", "stdout", "stderr"))
            for r in (0, 1) if (rank_dir / f"rank{r}.exit").exists()}


def history(out: Path) -> list[dict]:
    return load_checkpoint(next(out.rglob("last.pt")))["train_state"]["history"]


def assert_same_training(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-4


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, batch 8: what every 2-rank run below must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run = subprocess.run(
        [sys.executable, "-m", "tinytale", "train", *COMMON, "--set", "train.batch_size=8",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def test_two_gloo_ranks_match_one_process(tmp_path, single):
    ddp = subprocess.run(
        torchrun("train", *COMMON, "--set", "train.batch_size=4", "--set",
                 "train.peak_tflops=0.5", "--out", str(tmp_path)),
        capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    # Only rank 0 wrote checkpoints: one run folder.
    assert len(list(tmp_path.rglob("last.pt"))) == 1
    assert_same_training(history(single), history(tmp_path))
    # MFU is per device: both ranks' tokens over both devices' peak.
    flops_per_token = load_model(next(tmp_path.rglob("last.pt")))[0].flops_per_token()
    for h in history(tmp_path):
        assert h["mfu"] == pytest.approx(flops_per_token * h["tokens_per_sec"] / (0.5e12 * 2))


def test_gradient_accumulation_across_ranks_matches_one_process(tmp_path, single):
    """2 ranks x batch 2 x 2 micro-batches: the first micro-batch of each step runs under
    DDP's no_sync (no all-reduce), the second all-reduces the summed gradient."""
    ddp = subprocess.run(
        torchrun("train", *COMMON, "--set", "train.batch_size=2", "--set",
                 "train.grad_accum_steps=2", "--out", str(tmp_path)),
        capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    assert_same_training(history(single), history(tmp_path))


def test_two_ranks_track_one_mlflow_run(tmp_path, mlflow_server):
    name = f"ddp-{uuid.uuid4().hex[:8]}"
    ddp = subprocess.run(
        torchrun("train", "--json", *MODEL, "--set", "train.batch_size=4", "--set",
                 "tracking.samples=1", "--set", "tracking.system_metrics=false", "--set",
                 f"tracking.registered_model={name}", "--experiment", name,
                 "--tracking-uri", mlflow_server.url, "--out", str(tmp_path)),
        capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    summaries = [json.loads(line) for line in ddp.stdout.splitlines()
                 if line.startswith("{") and '"status"' in line]
    assert len(summaries) == 1  # rank 0's alone
    assert summaries[0]["status"] == "FINISHED"
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r.info.run_id for r in runs] == [summaries[0]["run_id"]]
    assert runs[0].info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "tokens_per_sec"):
        assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) \
            == [1, 2], key
    assert summaries[0].get("registered_version") == "1"


def test_sizes_that_give_no_step_across_ranks_are_one_sentence(tmp_path):
    """21 windows: enough for batch 16 in one process, not for 16 on each of 2 ranks."""
    ranks = tmp_path / "ranks"
    run = subprocess.run(
        torchrun("train", *COMMON, "--set", "data.n_stories=10", "--set",
                 "train.batch_size=16", "--out", str(tmp_path / "out"), wrapped=ranks),
        capture_output=True, text=True, timeout=300, env=wrapped_env(ranks))
    # torchrun itself exits 1 for any failed rank; the ranks exit 2. When the first rank
    # exits, torchrun terminates the other, which may not have recorded its exit yet.
    assert run.returncode != 0
    outputs = rank_outputs(ranks)
    assert outputs
    for code, _stdout, stderr in outputs.values():
        assert code == "2"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert "21 windows" in lines[0] and "x 2 processes = 32" in lines[0]
        assert "fewer processes" in lines[0]
    assert not (tmp_path / "out").exists()


def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step(tmp_path):
    """The ranks agree on a stop every STOP_AGREE_EVERY_STEPS steps and at epoch ends; had
    they stopped at different steps, the one left in a collective would fail, not exit 143."""
    ranks, out, hold = tmp_path / "ranks", tmp_path / "out", tmp_path / "hold"
    # All 216 lesson stories, global batch 4: ~110 steps an epoch. Both ranks wait after the
    # first micro-batch of epoch 2 until the signal has reached them (tests/support/holding.py), so
    # on any machine they stop mid-epoch, at the next multiple of STOP_AGREE_EVERY_STEPS.
    proc = subprocess.Popen(
        torchrun("train", *COMMON, "--set", "train.epochs=3", "--set", "train.batch_size=2",
                 "--set", "data.n_stories=216",
                 "--out", str(out), wrapped=ranks),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=hold_env(hold, 2, 1, wrapped_env(ranks)),
        start_new_session=True)  # its own process group, as a container's or a shell job's
    try:
        wait_held(hold, proc, count=2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    outputs = rank_outputs(ranks)
    assert sorted(outputs) == [0, 1]
    for code, _stdout, stderr in outputs.values():
        assert code == "143", stderr
        assert "Traceback" not in stderr
    summary = json.loads(outputs[0][1].strip().splitlines()[-1])
    assert summary["status"] == "KILLED"
    saved = load_checkpoint(next(out.rglob("last.pt")))
    state = saved["train_state"]
    assert not saved["finished"] and state["epoch"] == 2
    assert state["batch"] > 0 and state["step"] % STOP_AGREE_EVERY_STEPS == 0, state
