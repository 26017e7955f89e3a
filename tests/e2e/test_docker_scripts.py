"""The docker/ scripts on the host, without an engine: the build's commit resolver on real git
repositories, and the MLflow server's access log on a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import free_port

REPO = Path(__file__).resolve().parents[2]
RESOLVER = REPO / "docker" / "git-commit.py"
SERVER = REPO / "docker" / "mlflow-server.sh"

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def resolve(git_dir: Path, override: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RESOLVER), str(git_dir), override],
                          capture_output=True, text=True, timeout=30, check=False)


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                          check=True, timeout=30)
    return done.stdout.strip()


@needs_git
def test_commit_resolver_agrees_with_git(tmp_path):
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    git(tmp_path, "commit", "--quiet", "--allow-empty", "-m", "first")
    first = git(tmp_path, "rev-parse", "HEAD")
    assert resolve(tmp_path / ".git").stdout.strip() == first  # a loose ref
    git(tmp_path, "commit", "--quiet", "--allow-empty", "-m", "second")
    git(tmp_path, "pack-refs", "--all")  # what `git gc` does: the ref only in packed-refs
    second = git(tmp_path, "rev-parse", "HEAD")
    assert not (tmp_path / ".git" / "refs" / "heads" / "main").exists()
    assert resolve(tmp_path / ".git").stdout.strip() == second
    git(tmp_path, "checkout", "--quiet", "--detach", first)
    assert resolve(tmp_path / ".git").stdout.strip() == first


def test_commit_resolver_without_git_and_with_an_override(tmp_path):
    assert resolve(tmp_path).stdout == "\n"  # no HEAD: unknown, and not an error
    (tmp_path / "HEAD").write_text("ref: refs/heads/gone\n")
    assert resolve(tmp_path).stdout == "\n"
    assert resolve(tmp_path, "ABC1234").stdout == "abc1234\n"
    bad = resolve(tmp_path, "main")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "git-commit: ERROR: TINYTALE_GIT_COMMIT='main' is not a commit hash; pass "
        "`git rev-parse HEAD` or leave it empty."]


def put(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def script_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """docker/mlflow-server.sh on a free port with its state in tmp_path/mlflow, once /health
    answers: (base URL, log file). Stopped on exit."""
    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TINYTALE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               TMPDIR=str(tmp_path / "tmp"), TINYTALE_MLFLOW_HOME=str(tmp_path / "mlflow"),
               TINYTALE_MLFLOW_PORT=str(port), TINYTALE_MLFLOW_WORKERS="1",
               MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{port}")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", str(SERVER)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield base, log
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_server_logs_only_requests_it_failed(tmp_path):
    """Successes (artifact uploads, /health) and client errors (404) leave no access line; a
    request the server fails does, since MLflow may answer it without logging anything."""
    with script_server(tmp_path) as (base, log):
        artifacts = f"{base}/api/2.0/mlflow-artifacts/artifacts"
        assert put(f"{artifacts}/upload.txt", b"a story") == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get?experiment_id=4242",
                                   timeout=30)
        assert missing.value.code == 404
        # A file where the upload needs a folder: the server fails (NotADirectoryError).
        assert put(f"{artifacts}/upload.txt/inside.txt", b"a story") == 500
        deadline = time.monotonic() + 10
        while "inside.txt" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    text = log.read_text()
    assert '"PUT /api/2.0/mlflow-artifacts/artifacts/upload.txt/inside.txt HTTP/1.1" 500' in text
    assert "NotADirectoryError" in text  # and the traceback
    for quiet in ("/health", "upload.txt HTTP", "experiment_id=4242"):
        assert quiet not in text, text
    assert "Application startup complete" in text  # uvicorn's own messages stay
    assert "StarletteDeprecationWarning" not in text


def test_server_refuses_an_unknown_access_log_setting(tmp_path):
    env = {**os.environ, "TINYTALE_MLFLOW_ACCESS_LOG": "quiet",
           "MLFLOW_SERVER_ALLOWED_HOSTS": "localhost:*", "TINYTALE_MLFLOW_HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(SERVER)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "mlflow-server: ERROR: TINYTALE_MLFLOW_ACCESS_LOG='quiet' is not 'errors' or 'all'"]


# A database one schema revision behind the installed MLflow, with a run in it: MLflow's own
# store writes the run, then alembic undoes the newest migration (it has a real downgrade).
OLD_SCHEMA = """
import sys
from alembic import command
from mlflow.entities import Metric
from mlflow.store.db.utils import _get_alembic_config, _get_schema_version
from mlflow.tracking import MlflowClient
import sqlalchemy

uri = sys.argv[1]
client = MlflowClient(tracking_uri=uri)
run = client.create_run(client.create_experiment("before-upgrade"), run_name="old")
client.log_batch(run.info.run_id, metrics=[Metric("val_loss", 1.0 / s, 0, s) for s in (1, 2, 3)])
client.set_terminated(run.info.run_id)
engine = sqlalchemy.create_engine(uri)
head = _get_schema_version(engine)
with engine.begin() as conn:
    config = _get_alembic_config(str(engine.url))
    config.attributes["connection"] = conn
    command.downgrade(config, "-1")
print(run.info.run_id, head, _get_schema_version(engine))
"""


def test_server_upgrades_a_database_of_the_previous_schema(tmp_path):
    """The entrypoint runs `mlflow db upgrade`: a bumped MLflow pin starts on an old database
    and serves the runs it holds. (MLflow 3.17's server would also repair this particular
    database itself, since the newest migration adds tables, and says so in its log; after a
    migration that only alters columns it refuses to start instead. The test checks that the
    entrypoint's upgrade, not that repair, brought the schema up.)"""
    db = tmp_path / "mlflow" / "db" / "mlflow.db"
    db.parent.mkdir(parents=True)
    made = subprocess.run([sys.executable, "-c", OLD_SCHEMA, f"sqlite:///{db}"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    run_id, head, old = made.stdout.split()[-3:]
    assert old != head

    with script_server(tmp_path) as (base, log):
        query = f"run_id={run_id}&metric_key=val_loss"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/metrics/get-history?{query}",
                                    timeout=30) as response:
            history = json.load(response)["metrics"]
    # The entrypoint's upgrade did it, before the server: MLflow's own repair logs this line.
    text = log.read_text()
    assert "upgrading the database schema" in text
    assert "Creating initial MLflow database tables" not in text, text[-3000:]
    assert sorted(m["step"] for m in history) == [1, 2, 3]
    version = sqlite3.connect(db).execute("SELECT version_num FROM alembic_version").fetchall()
    assert version == [(head,)]


@pytest.mark.parametrize(("uri", "message"), [
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "holds a password"),
    ("mysql://mlflow@db/mlflow", "is neither sqlite:////ABSOLUTE/PATH nor postgresql://"),
    ("sqlite:///relative.db", "is neither sqlite:////ABSOLUTE/PATH nor postgresql://"),
])
def test_server_refuses_a_database_uri_it_cannot_use_safely(tmp_path, uri, message):
    env = {**os.environ, "TINYTALE_MLFLOW_DATABASE_URI": uri,
           "MLFLOW_SERVER_ALLOWED_HOSTS": "localhost:*", "TINYTALE_MLFLOW_HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(SERVER)], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("mlflow-server: ERROR: TINYTALE_MLFLOW_DATABASE_URI") and message in line
    assert list(tmp_path.iterdir()) == []  # refused before anything was created
