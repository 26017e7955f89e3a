"""The compose stack from the host, for the Docker end-to-end tests: the engine and build
arguments (scripts/docker-offline.sh), and `Stack`, one compose project on a port of its own,
read over MLflow's REST API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "scripts" / "docker-offline.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"
BUILD_TIMEOUT_S = 1200


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    info = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return info.returncode == 0


def offline_env() -> dict[str, str]:
    """Run the setup script (idempotent) and return the variables it prints."""
    done = subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT_S,
    )
    if done.returncode != 0:
        pytest.fail(f"{SETUP_SCRIPT.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    env = {}
    for line in done.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    return env


def compose_env() -> dict[str, str]:
    """The environment for `docker compose`: an engine, compose v2 and the build arguments."""
    online = os.environ.get("TINYTALE_E2E_ONLINE") == "1"
    if not docker_answers() and not IN_CI:
        pytest.skip(
            "no Docker engine answers `docker info`: start one (scripts/docker-offline.sh "
            "does on Debian); under CI=true this is a failure"
        )
    env = dict(os.environ)
    if not online:
        env.update(offline_env())  # under CI=true this installs and starts the engine too
    if not docker_answers():
        pytest.fail("no Docker engine answers `docker info`, and CI=true requires one")
    return env


@dataclass
class Stack:
    project: str
    port: int
    env: dict[str, str]
    timings: dict[str, float]
    trainer_exit_code: int | None = None

    def compose(
        self,
        *args: str,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "--project-directory", str(REPO), *args]
        done = subprocess.run(
            argv,
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stderr[-4000:]}"
                f"\n{self.logs()}"
            )
        return done

    def logs(self) -> str:
        argv = [
            "docker",
            "compose",
            "--project-directory",
            str(REPO),
            "logs",
            "--no-color",
            "--tail",
            "60",
        ]
        done = subprocess.run(
            argv, cwd=REPO, env=self.env, capture_output=True, text=True, check=False, timeout=60
        )
        return f"--- compose logs ---\n{done.stdout[-6000:]}{done.stderr[-2000:]}"

    def container(self, service: str) -> str:
        return self.compose("ps", "--all", "--quiet", service).stdout.strip()

    def api(self, endpoint: str, **params: Any) -> dict[str, Any]:
        """GET one MLflow REST endpoint from the host, the way a browser reaches the UI."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"http://127.0.0.1:{self.port}/api/2.0/mlflow/{endpoint}?{query}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def search_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/2.0/mlflow/runs/search",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response).get("runs", [])

    def runs_of(self, experiment: str) -> list[dict[str, Any]]:
        found = self.api("experiments/get-by-name", experiment_name=experiment)["experiment"]
        return self.search_runs(found["experiment_id"])
