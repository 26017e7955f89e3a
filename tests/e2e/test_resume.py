"""Real signals against a real `tinytale train` process: graceful stop, SIGKILL, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from support.holding import hold_env, wait_held

from tinytale.checkpoint import load_checkpoint, save_checkpoint

ARGS = ["--no-tracking", "--json",
        "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
        "--set", "model.block_size=16", "--set", "model.dropout=0.1",
        "--set", "train.batch_size=8", "--set", "train.warmup_steps=4",
        "--set", "data.n_stories=80", "--set", "train.device=cpu", "--set", "train.num_threads=1"]


def tinytale(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinytale", *args]


def start_held(out: Path, hold: Path, epoch: int, batch: int, *extra: str) -> subprocess.Popen:
    """Training that waits after micro-batch `batch` of `epoch` until it gets a signal (see
    tests/support/holding.py): it cannot finish before the signal lands, however fast it trains."""
    proc = subprocess.Popen(tinytale("train", *ARGS, "--out", str(out), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=hold_env(hold, epoch, batch))
    try:
        wait_held(hold, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def last_state(out: Path) -> dict | None:
    found = sorted(out.rglob("last.pt"))
    if not found:
        return None
    try:
        return load_checkpoint(found[0])
    except Exception:
        return None


def history(out: Path) -> list[dict]:
    return load_checkpoint(next(out.rglob("last.pt")))["train_state"]["history"]


def test_sigterm_checkpoints_and_resume_auto_continues(tmp_path):
    out = tmp_path / "runs"
    proc = start_held(out, tmp_path / "hold", 2, 3, "--set", "train.epochs=12")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "KILLED"
    stopped = last_state(out)
    assert not stopped["finished"]
    assert (stopped["train_state"]["epoch"], stopped["train_state"]["batch"]) == (2, 3)

    # A value that differs from the run's is not applied, and the log says so.
    resumed = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--resume", "auto",
                                      "--set", "train.epochs=12", "--set", "train.lr=1e-3"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "[resume_keeps_run_config] train.lr=0.003 (not 0.001)" in resumed.stderr
    epochs = [h["epoch"] for h in history(out)]
    assert epochs == list(range(1, 13))
    assert len(list(out.rglob("last.pt"))) == 1  # resumed into the same run folder


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    epochs = ["--set", "train.epochs=4", "--set", "train.checkpoint_every_steps=2"]
    straight = subprocess.run(tinytale("train", *ARGS, "--out", str(tmp_path / "a"), *epochs),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "b"
    # Held before the step of micro-batch 3 of epoch 2: one of steps 1 and 2 of the epoch
    # wrote last.pt (every 2nd step of the run does), so the kill is mid-epoch.
    proc = start_held(out, tmp_path / "hold", 2, 3, *epochs)
    killed_at = last_state(out)["train_state"]
    assert killed_at["epoch"] == 2 and killed_at["batch"] in (1, 2), killed_at
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--resume", "auto",
                                      *epochs), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    a, b = history(tmp_path / "a"), history(out)
    assert [h["epoch"] for h in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):  # bit-identical on CPU
        assert (x["train_loss"], x["val_loss"]) == (y["train_loss"], y["val_loss"])


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "runs"
    first = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--set", "train.epochs=3"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    last = next(out.rglob("last.pt"))
    prev = last.with_name("last.prev.pt")
    # Make the previous checkpoint look unfinished and the newest one truncated.
    state = load_checkpoint(prev)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, prev)
    last.write_bytes(last.read_bytes()[:100])
    os.utime(prev, (time.time() - 5, time.time() - 5))

    bad = subprocess.run(tinytale("generate", str(last)), capture_output=True, text=True)
    assert bad.returncode == 2 and str(last) in bad.stderr and "Traceback" not in bad.stderr

    resumed = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--resume", "auto",
                                      "--set", "train.epochs=3"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    assert load_checkpoint(last)["finished"]


def test_best_checkpoint_holds_the_training_state_but_is_not_resumed_into(tmp_path):
    out = tmp_path / "runs"
    first = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--set", "train.epochs=2"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    best, last = next(out.rglob("best.pt")), next(out.rglob("last.pt"))
    best_state, last_state_ = load_checkpoint(best), load_checkpoint(last)
    # Everything the issue lists: model, optimizer, step, RNG, config, tokenizer, epoch, metrics.
    assert {"model", "optimizer", "rng", "config", "tokenizer", "train_state", "run_id"} <= \
        best_state.keys()
    assert best_state["model"].keys() == last_state_["model"].keys()
    assert best_state["optimizer"]["state"], "AdamW moments missing from best.pt"
    assert best_state["train_state"]["best_epoch"] == best_state["train_state"]["epoch"] - 1

    resumed = subprocess.run(tinytale("train", *ARGS, "--out", str(out), "--resume", str(best)),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2
    assert resumed.stderr.startswith("error:") and "Traceback" not in resumed.stderr
    assert "best-validation checkpoint" in resumed.stderr and str(last) in resumed.stderr


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A writer killed mid-save leaves only a temp file; the real checkpoint is untouched."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    code = (
        "import os, torch, signal\n"
        "from tinytale import checkpoint\n"
        "real_save = torch.save\n"
        "def dying_save(obj, f):\n"
        "    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n"
        f"checkpoint.save_checkpoint({{'model': {{'w': torch.zeros(3)}}}}, {str(path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
