"""The MLflow server as the image starts it (docker/mlflow-server.sh), as a subprocess on a
free loopback port: what the security and tracking-error tests run against."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.server import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "mlflow-server.sh"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT_S = 120


def _has_auth_extra() -> bool:
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it: mlflow[auth])
    except ImportError:
        return False
    return True


needs_auth_extra = pytest.mark.skipif(
    not _has_auth_extra() and not IN_CI,
    reason="MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]'); under CI=true "
    "this is a failure",
)


def _script_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """A clean environment for the script: nothing MLflow- or TINYTALE_MLFLOW-ish inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TINYTALE_MLFLOW_"))}
    home.mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(exist_ok=True)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TMPDIR=str(home / "tmp"),
        TINYTALE_MLFLOW_HOME=str(home / "mlflow"),
        TINYTALE_MLFLOW_PORT=str(port),
        TINYTALE_MLFLOW_WORKERS="1",
        MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{port},localhost:{port}",
    )
    env.update(extra)
    return env


@dataclass
class Shipped:
    """One server started by docker/mlflow-server.sh."""

    port: int
    home: Path  # the test's folder; the server's state is home/mlflow
    process: subprocess.Popen
    password: str | None = None

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    def log(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")[-4000:]

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        host: str | None = None,
        auth: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send `path` byte for byte (no normalisation) with the given Host header."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            if auth is None and self.password is not None:
                auth = ("admin", self.password)
            if auth:
                token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                conn.putheader("Authorization", f"Basic {token}")
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body or b"")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def api(self, method: str, endpoint: str, payload: dict) -> tuple[int, dict]:
        status, body = self.request(
            method,
            f"/api/2.0/mlflow/{endpoint}",
            json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            return status, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return status, {"raw": body.decode(errors="replace")}

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)  # its own session: pgid == pid
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue


def _spawn(home: Path, password: str | None = None, **extra: str) -> Shipped:
    """Start the script in `home`; `extra` environment values may name {port}."""
    port = free_port()
    extra = {k: v.format(port=port) for k, v in extra.items()}
    if password is not None:
        extra.update(TINYTALE_MLFLOW_AUTH="1", TINYTALE_MLFLOW_ADMIN_PASSWORD=password)
    env = _script_env(home, port, **extra)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        cwd=home,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Shipped(port, home, process, password)


def _wait_healthy(servers: list[Shipped]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(servers)
    while pending and time.monotonic() < deadline:
        for server in list(pending):
            if server.process.poll() is not None:
                pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log()}")
            try:
                status, _ = server.request("GET", "/health", auth=("", ""))
            except OSError:
                continue
            if status == 200:
                pending.remove(server)
        time.sleep(0.3)
    if pending:
        pytest.fail(f"no /health within {START_TIMEOUT_S} s:\n{pending[0].log()}")


@contextlib.contextmanager
def started_together(spawns: dict[str, Callable[[], Shipped]]) -> Iterator[dict[str, Shipped]]:
    """Start each server, wait until all answer (they boot in parallel), stop them all after,
    also when one fails to start."""
    started: dict[str, Shipped] = {}
    try:
        for name, spawn in spawns.items():
            started[name] = spawn()
        _wait_healthy(list(started.values()))
        yield started
    finally:
        for server in started.values():
            server.stop()
