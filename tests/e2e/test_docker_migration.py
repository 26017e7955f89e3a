"""Moving a SQLite stack's runs into the PostgreSQL stack (README "Moving from SQLite"), on a
compose project of its own: the real images, the real databases, read over the REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support.compose_stack import BUILD_TIMEOUT_S, Stack, compose_env
from support.server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2 * BUILD_TIMEOUT_S)]


@pytest.fixture(scope="module")
def docker_env() -> dict[str, str]:
    return compose_env()


# An MLflow SQLite database as a stack before PostgreSQL (or `mlflow ui` on a laptop) leaves it:
# a run with params, tags and a metric history, a registered version with the champion alias.
OLD_SQLITE_STACK = """
import sys
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

uri = "sqlite:///" + sys.argv[1]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
experiment = client.create_experiment("before-postgres")
run = client.create_run(experiment, run_name="sqlite-era")
run_id = run.info.run_id
client.log_batch(run_id, metrics=[Metric("val_loss", 2.0 / s, 1000 * s, s) for s in range(1, 6)],
                 params=[Param("lr", "0.003")], tags=[RunTag("tinytale.sweep", "old")])
client.set_terminated(run_id)
client.create_registered_model("sqlite-era-model")
version = client.create_model_version("sqlite-era-model", f"runs:/{run_id}/model", run_id=run_id)
client.set_registered_model_alias("sqlite-era-model", "champion", version.version)
print(run_id)
"""


def test_runs_of_a_sqlite_stack_move_to_postgresql(
    docker_env: dict[str, str], tmp_path: Path
) -> None:
    """README "Moving from SQLite": the old mlflow.db in the mlflow-db volume is copied into a
    new stack's PostgreSQL by `docker compose run -e TINYTALE_MLFLOW_MIGRATE_FROM=... mlflow`."""
    old_db = tmp_path / "mlflow.db"
    made = subprocess.run([sys.executable, "-c", OLD_SQLITE_STACK, str(old_db)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    run_id = made.stdout.split()[-1]
    old_db.chmod(0o644)  # read by uid 10001 in the container
    port = free_port()
    project = f"tinytale-e2e-migrate-{os.getpid()}"
    env = {**docker_env, "COMPOSE_PROJECT_NAME": project, "TINYTALE_MLFLOW_PORT": str(port)}
    stack = Stack(project, port, env, {})
    migrate = ("run", "--rm", "-e", "TINYTALE_MLFLOW_MIGRATE_FROM=/mlflow/db/mlflow.db", "mlflow")
    try:
        stack.compose("up", "--detach", "--wait", "mlflow", timeout=BUILD_TIMEOUT_S)
        # Where the stack before PostgreSQL kept it: /mlflow/db in the mlflow-db volume.
        stack.compose("cp", str(old_db), "mlflow:/mlflow/db/mlflow.db")
        done = stack.compose(*migrate, timeout=300)
        copied = json.loads(done.stdout.strip().splitlines()[-1])["copied_rows"]
        assert copied["runs"] == 1 and copied["metrics"] == 5, copied

        (run,) = stack.runs_of("before-postgres")
        assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.003"}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["tinytale.sweep"] == "old"
        history = stack.api("metrics/get-history", run_id=run_id, metric_key="val_loss")
        assert [m["step"] for m in history["metrics"]] == [1, 2, 3, 4, 5]
        alias = stack.api("registered-models/alias", name="sqlite-era-model", alias="champion")
        assert alias["model_version"]["run_id"] == run_id
        # New experiments get ids past the copied ones (PostgreSQL's sequences were moved).
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "after-postgres"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["experiment_id"] != run["info"]["experiment_id"]

        # A second copy would mix two histories: refused with one sentence, nothing changed.
        again = stack.compose(*migrate, timeout=300, check=False)
        assert again.returncode == 2, again.stderr[-2000:]
        assert "already holds 1 runs" in again.stderr
        assert len(stack.runs_of("before-postgres")) == 1
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)
