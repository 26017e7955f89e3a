"""Configs and paths the tests share."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A config small enough to train in about a second on one CPU core.
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
    "train.epochs=3", "train.batch_size=8", "train.warmup_steps=2",
    "tracking.samples=1",
]
