"""Shared fixtures: a real `mlflow server` subprocess on a free loopback port, tiny configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tinytale.mlflow_tracker.local_server import LocalServer, free_port

__all__ = ["TINY", "MlflowServer", "free_port"]  # imported by test modules

REPO = Path(__file__).resolve().parents[1]

# A config small enough to train in about a second on one CPU core.
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
    "train.epochs=3", "train.batch_size=8", "train.warmup_steps=2",
    "tracking.samples=1",
]


# The same server the benchmarks and scripts/fault_injection.py start.
MlflowServer = LocalServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server (SQLite backend, served artifacts) for the session."""
    with LocalServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def fresh_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of the test's own, for tests that stop and restart it."""
    with LocalServer(tmp_path / "mlflow-server") as server:
        yield server


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
