"""Shared fixtures: a real `mlflow server` subprocess on a free loopback port, tiny configs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A config small enough to train in about a second on one CPU core.
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
    "train.epochs=3", "train.batch_size=8", "train.warmup_steps=2",
    "tracking.samples=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    port: int
    root: Path
    process: subprocess.Popen

    def stop(self) -> None:
        """Stop the server and its worker processes (its own process group)."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        # uvicorn may outlive the `mlflow server` parent for a moment: free the port.
        _signal_group(self.process, signal.SIGKILL)

    def start(self) -> None:
        """(Re)start on the same port and store: used by outage tests."""
        self.process = _spawn(self.root, self.port)
        _wait_healthy(self.url, self.process)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # started with start_new_session: pgid == pid


def _spawn(root: Path, port: int) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(
        [
            str(mlflow_bin), "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # No GenAI job runner (two more Python processes tinytale never uses).
        env={**os.environ, "MLFLOW_TRACKING_URI": "",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server at {url} did not become healthy in {timeout}s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server (SQLite backend, served artifacts) for the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, _spawn(root, port))
    try:
        _wait_healthy(server.url, server.process)
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of the test's own, for tests that stop and restart it."""
    port = free_port()
    root = tmp_path / "mlflow-server"
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, _spawn(root, port))
    try:
        _wait_healthy(server.url, server.process)
        yield server
    finally:
        server.stop()


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
