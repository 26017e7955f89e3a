"""torchrun with 2 CPU processes (gloo) matches one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

from conftest import free_port

from tinytale.checkpoint import load_checkpoint

COMMON = ["--no-tracking", "--json", "--set", "model.n_layer=1", "--set", "model.n_head=2",
          "--set", "model.n_embd=32", "--set", "model.block_size=16", "--set", "model.bias=false",
          "--set", "train.epochs=2", "--set", "train.warmup_steps=2", "--set",
          "data.n_stories=80", "--set", "train.device=cpu", "--set", "train.num_threads=1"]


def history(out):
    return load_checkpoint(next(out.rglob("last.pt")))["train_state"]["history"]


def test_two_gloo_ranks_match_one_process(tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "tinytale", "train", *COMMON, "--set", "train.batch_size=8",
         "--out", str(tmp_path / "single")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr

    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "tinytale", "train", *COMMON, "--set", "train.batch_size=4",
         "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    # Only rank 0 wrote checkpoints: one run folder.
    assert len(list((tmp_path / "ddp").rglob("last.pt"))) == 1

    for a, b in zip(history(tmp_path / "single"), history(tmp_path / "ddp"), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
