"""`docker compose up` end to end: the real images, the real server, asserted from the host.

The stack is built and started as a user would (`docker compose up`, here detached so the test
can watch it), under a compose project name and a port of its own; the run, its per-epoch
metrics and the registered model are then read over MLflow's REST API on 127.0.0.1.

Images are built from scripts/docker-offline.sh's local base image and wheelhouse, because this
project's CI has no image registry and no TLS to PyPI from containers (the script also starts an
engine where none runs). TINYTALE_E2E_ONLINE=1 builds from python:3.11-slim and PyPI instead.
Without a Docker engine the tests skip, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.compose_stack import BUILD_TIMEOUT_S, IN_CI, REPO, SETUP_SCRIPT, Stack, compose_env
from support.server import free_port

LESSON = REPO / "experiments" / "lesson.yaml"
TRAIN_TIMEOUT_S = 900

# Building both images on a fresh machine takes minutes; the module fixture counts toward
# the first test's limit.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2 * BUILD_TIMEOUT_S)]


@pytest.fixture(scope="module")
def docker_env() -> dict[str, str]:
    """The environment for `docker compose`: an engine, compose v2 and the build arguments."""
    return compose_env()


@pytest.fixture(scope="module")
def stack(docker_env: dict[str, str]) -> Iterator[Stack]:
    """`docker compose up` of a project of its own; torn down with its volumes afterwards."""
    port = free_port()
    project = f"tinytale-e2e-{os.getpid()}"
    env = {**docker_env, "COMPOSE_PROJECT_NAME": project, "TINYTALE_MLFLOW_PORT": str(port)}
    stack = Stack(project, port, env, {})
    try:
        start = time.monotonic()
        stack.compose("build", "mlflow", "trainer", timeout=BUILD_TIMEOUT_S)
        stack.timings["build_s"] = time.monotonic() - start
        start = time.monotonic()
        # What `docker compose up` does, detached: the test cannot press Ctrl-C.
        stack.compose("up", "--detach", timeout=300)
        trainer = stack.container("trainer")
        waited = subprocess.run(
            ["docker", "wait", trainer],
            capture_output=True,
            text=True,
            timeout=TRAIN_TIMEOUT_S,
            check=False,
        )
        stack.timings["up_to_trainer_exit_s"] = time.monotonic() - start
        stack.trainer_exit_code = int(waited.stdout.strip() or -1)
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)
        print(f"\ndocker e2e timings: {stack.timings}")


def _lesson_epochs() -> int:
    return int(yaml.safe_load(LESSON.read_text())["train"]["epochs"])


def _lesson_tracking() -> dict[str, Any]:
    return yaml.safe_load(LESSON.read_text())["tracking"]


def _finished_run(stack: Stack) -> dict[str, Any]:
    experiment = stack.api(
        "experiments/get-by-name", experiment_name=_lesson_tracking()["experiment"]
    )["experiment"]
    runs = stack.search_runs(experiment["experiment_id"])
    assert len(runs) == 1, f"expected the one run of `docker compose up`, found {len(runs)}"
    return runs[0]


def test_compose_up_trains_and_leaves_the_server_running(stack: Stack) -> None:
    code = stack.trainer_exit_code
    assert code == 0, f"the trainer exited with {code}\n{stack.logs()}"
    mlflow = stack.container("mlflow")
    state = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Status}}", mlflow],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert state == "running", f"the MLflow server is {state} after training, not running"


def test_run_finished_with_one_value_per_epoch(stack: Stack) -> None:
    run = _finished_run(stack)
    info = run["info"]
    assert info["status"] == "FINISHED", info
    # Artifacts went through the server (no shared filesystem with the trainer).
    assert info["artifact_uri"].startswith("mlflow-artifacts:"), info["artifact_uri"]
    epochs = _lesson_epochs()
    for key in ("train_loss", "val_loss"):
        history = stack.api("metrics/get-history", run_id=info["run_id"], metric_key=key).get(
            "metrics", []
        )
        steps = sorted(m["step"] for m in history)
        assert len(history) == epochs, f"{key}: {len(history)} values for {epochs} epochs"
        assert len(set(steps)) == epochs, f"{key}: steps {steps} are not one per epoch"


def test_best_checkpoint_is_a_registered_version(stack: Stack) -> None:
    run_id = _finished_run(stack)["info"]["run_id"]
    name = _lesson_tracking()["registered_model"]
    versions = stack.api("model-versions/search", filter=f"name='{name}'")["model_versions"]
    assert [v["run_id"] for v in versions] == [run_id], versions
    champion = stack.api("registered-models/alias", name=name, alias="champion")
    assert champion["model_version"]["run_id"] == run_id


def _is_commit_of_this_checkout(commit: str) -> bool:
    """True for HEAD or one of its ancestors: the tree may have moved on since the build."""
    if len(commit) not in (40, 64):
        return False
    done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO,
                          capture_output=True, check=False)
    return done.returncode == 0


# The build reads the commit from .git (docker/git-commit.py); a worktree's .git is a pointer
# file outside the build context, and an export has none.
needs_git_dir = pytest.mark.skipif(
    not (REPO / ".git").is_dir() or shutil.which("git") is None,
    reason="the checkout has no .git folder (or no git) to compare the image's commit with",
)


@needs_git_dir
def test_trainer_image_knows_its_source_commit(stack: Stack) -> None:
    done = stack.compose(
        "run", "--rm", "--no-deps", "--entrypoint", "/bin/sh", "trainer",
        "/usr/local/bin/tinytale-entrypoint", "sh", "-c", 'printf %s "$TINYTALE_GIT_COMMIT"',
    )
    assert _is_commit_of_this_checkout(done.stdout.strip()), done.stdout


@needs_git_dir
def test_run_in_a_container_is_tagged_with_the_source_commit(stack: Stack) -> None:
    tags = {t["key"]: t["value"] for t in _finished_run(stack)["data"].get("tags", [])}
    assert _is_commit_of_this_checkout(tags.get("git_commit", "")), tags


def test_server_logs_only_requests_it_failed(stack: Stack) -> None:
    """The trainer's requests and the healthchecks leave no access line (neither do the 404s
    of a new experiment); a request the server fails still does."""
    artifacts = f"http://127.0.0.1:{stack.port}/api/2.0/mlflow-artifacts/artifacts"
    # A file where the upload needs a folder: the server fails (NotADirectoryError).
    for path, expected in (("e2e-log-check", 200), ("e2e-log-check/inside", 500)):
        request = urllib.request.Request(f"{artifacts}/{path}", b"x", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status == expected, (path, status)
    failed = '"PUT /api/2.0/mlflow-artifacts/artifacts/e2e-log-check/inside HTTP/1.1" 500'
    deadline = time.monotonic() + 30  # the log line is written after the answer
    while failed not in (logs := stack.compose("logs", "--no-color", "mlflow").stdout):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(0.2)
    quiet = [line for line in logs.splitlines() if '" 200' in line or '" 404' in line
             or "/health" in line]
    assert not quiet, quiet[:5]


def test_containers_run_unprivileged_and_publish_on_loopback(stack: Stack) -> None:
    mlflow = stack.container("mlflow")
    uid = subprocess.run(
        ["docker", "exec", mlflow, "id", "-u"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert uid == "10001", f"the MLflow server runs as uid {uid}"
    trainer = stack.container("trainer")
    user = subprocess.run(
        ["docker", "inspect", "--format", "{{.Config.User}}", trainer],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert user == "tinytale", f"the trainer image's user is {user!r}"
    published = subprocess.run(
        ["docker", "port", mlflow, "5000"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert published == [f"127.0.0.1:{stack.port}"], published


def _psql(stack: Stack, sql: str) -> str:
    """One query in the database container, as the MLflow user over the local socket."""
    return stack.compose("exec", "-T", "db", "psql", "--username", "mlflow", "--dbname",
                         "mlflow", "--tuples-only", "--no-align", "--command", sql).stdout.strip()


def test_runs_live_in_postgresql(stack: Stack) -> None:
    """The server's backend is the database container, not a SQLite file in its volume."""
    run_id = _finished_run(stack)["info"]["run_id"]
    assert _psql(stack, f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == "FINISHED"
    epochs = _lesson_epochs()
    count = _psql(stack, f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' "
                         "AND key = 'val_loss'")
    assert int(count) == epochs
    listing = stack.compose("exec", "-T", "mlflow", "ls", "-A", "/mlflow/db").stdout.split()
    assert "mlflow.db" not in listing, listing


def _inspect(container: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", template, container],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_database_is_reachable_only_from_the_mlflow_server(stack: Stack) -> None:
    db, mlflow = stack.container("db"), stack.container("mlflow")
    assert _inspect(db, "{{json .NetworkSettings.Ports}}") in ("{}", "null")
    db_networks = set(json.loads(_inspect(db, "{{json .NetworkSettings.Networks}}")))
    assert db_networks == {f"{stack.project}_database"}, db_networks
    mlflow_networks = set(json.loads(_inspect(mlflow, "{{json .NetworkSettings.Networks}}")))
    assert db_networks < mlflow_networks, mlflow_networks
    internal = subprocess.run(["docker", "network", "inspect", "--format", "{{.Internal}}",
                               f"{stack.project}_database"], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert internal == "true"
    probe = ("import socket\ntry:\n    socket.create_connection(('db', 5432), timeout=5)\n"
             "    print('reached')\nexcept OSError as e:\n    print('unreachable', e)")
    from_server = stack.compose("exec", "-T", "mlflow", "python", "-c", probe).stdout
    assert from_server.startswith("reached"), from_server
    from_trainer = stack.compose("run", "--rm", "--no-deps", "--entrypoint", "python",
                                 "trainer", "-c", probe).stdout
    assert from_trainer.startswith("unreachable"), from_trainer


def test_services_restart_after_a_crash_and_the_trainer_does_not(stack: Stack) -> None:
    policies = {s: _inspect(stack.container(s), "{{.HostConfig.RestartPolicy.Name}}")
                for s in ("db", "mlflow", "trainer")}
    assert policies == {"db": "unless-stopped", "mlflow": "unless-stopped", "trainer": "no"}
    # A crash of the server (SIGKILL, as the OOM killer sends it) comes back by itself. Not
    # `docker kill`: the engine counts that as a manual stop and restarts nothing.
    mlflow = stack.container("mlflow")
    restarts = int(_inspect(mlflow, "{{.RestartCount}}"))
    crash = ("import os, signal; "  # the server is the one child of the container's init
             "os.kill(int(open('/proc/1/task/1/children').read().split()[0]), signal.SIGKILL)")
    stack.compose("exec", "-T", "mlflow", "python", "-c", crash)
    # Back means: restarted, and answering on the host's published port. Not the health
    # status alone: while the engine waits to restart the container it still shows the old
    # "healthy", and the host port answers only once the new container runs.
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline, f"the server did not come back\n{stack.logs()}"
        if int(_inspect(mlflow, "{{.RestartCount}}")) > restarts and \
                _inspect(mlflow, "{{.State.Status}} {{.State.Health.Status}}") == \
                "running healthy":
            try:
                run = _finished_run(stack)
                break
            except OSError:  # connection refused or reset: the port is not forwarded yet
                pass
        time.sleep(1)
    assert run["info"]["status"] == "FINISHED"


def _registered_champion(stack: Stack) -> str:
    name = _lesson_tracking()["registered_model"]
    return stack.api("registered-models/alias", name=name, alias="champion")[
        "model_version"]["run_id"]


def test_runs_survive_compose_down(stack: Stack) -> None:
    """`down` keeps the named volumes: the server comes back with the same run, its metrics,
    its registered version and the `champion` alias."""
    run_id = _finished_run(stack)["info"]["run_id"]
    stack.compose("down", timeout=300)
    stack.compose("up", "--detach", "--wait", "mlflow", timeout=300)
    assert _finished_run(stack)["info"]["run_id"] == run_id
    assert len(_epochs_logged(stack, run_id)) == _lesson_epochs()
    assert _registered_champion(stack) == run_id


def _epochs_logged(stack: Stack, run_id: str) -> list[int]:
    history = stack.api("metrics/get-history", run_id=run_id, metric_key="val_loss")
    return sorted(m["step"] for m in history.get("metrics", []))


def test_compose_run_trains_any_experiment(stack: Stack) -> None:
    """`docker compose run --rm trainer train experiments/X.yaml --set ...`, as the README says."""
    done = stack.compose(
        "run", "--rm", "trainer", "train", "experiments/overfit.yaml",
        "--set", "train.epochs=2", "--experiment", "e2e-run", "--json",
        timeout=TRAIN_TIMEOUT_S,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and summary["run_id"], summary
    (run,) = stack.runs_of("e2e-run")
    assert run["info"]["run_id"] == summary["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert _epochs_logged(stack, summary["run_id"]) == [1, 2]


def _run_held_trainer(stack: Stack, name: str, *args: str, env: tuple[str, ...] = ()) -> None:
    """`compose run` a trainer held at micro-batch 1 of epoch 2 (tests/hold) until a signal
    or a `release` file: a fast machine cannot finish the run before the test acts."""
    stack.compose(
        "run", "--detach", "--name", name, "-e", "TINYTALE_TRACKING_FLUSH_S=0.5", *env,
        "-v", f"{REPO / 'tests' / 'hold'}:/hold:ro", "-e", "PYTHONPATH=/hold",
        "-e", "TINYTALE_TEST_HOLD=2:1", "-e", "TINYTALE_TEST_HOLD_DIR=/tmp/hold", "trainer",
        "train", "--set", "train.epochs=4", *args,
    )


def _wait_until_held_after_epoch_1(stack: Stack, name: str, experiment: str) -> str:
    """Until the trainer is held and epoch 1 reached the server; returns the run id."""
    deadline = time.monotonic() + 300
    while "held-" not in subprocess.run(
            ["docker", "exec", name, "ls", "/tmp/hold"], capture_output=True, text=True,
            check=False).stdout:
        assert time.monotonic() < deadline, f"the trainer was not held\n{stack.logs()}"
        time.sleep(0.5)
    while True:  # until epoch 1 reached the server: the run is well under way
        assert time.monotonic() < deadline, f"no epoch logged in 300 s\n{stack.logs()}"
        try:
            runs = stack.runs_of(experiment)
        except urllib.error.HTTPError:  # the experiment does not exist yet
            runs = []
        if runs and _epochs_logged(stack, runs[0]["info"]["run_id"]):
            return runs[0]["info"]["run_id"]
        time.sleep(0.5)


def test_stopped_trainer_saves_exits_143_and_resumes_the_same_run(stack: Stack) -> None:
    """SIGTERM from the engine (what `docker compose stop` sends) within the grace period."""
    name = f"{stack.project}-stopme"
    args = ["--experiment", "e2e-stop", "--run-name", "e2e-stop"]
    # Held in epoch 2 until the SIGTERM lands; the hold lets go when tinytale's handler asks
    # to stop.
    _run_held_trainer(stack, name, *args)
    try:
        _wait_until_held_after_epoch_1(stack, name, "e2e-stop")
        start = time.monotonic()
        subprocess.run(["docker", "stop", "--time", "30", name], check=True,
                       capture_output=True, timeout=120)
        stopped_in = time.monotonic() - start
        code = int(subprocess.run(["docker", "wait", name], capture_output=True, text=True,
                                  check=True, timeout=60).stdout.strip())
    finally:
        logs = subprocess.run(["docker", "logs", "--tail", "40", name], capture_output=True,
                              text=True, check=False).stderr
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    assert code == 143, f"the trainer exited {code} after SIGTERM\n{logs}"
    assert stopped_in < 30, f"stopping took {stopped_in:.1f} s, past stop_grace_period"
    (run,) = stack.runs_of("e2e-stop")
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "KILLED", run["info"]
    before = _epochs_logged(stack, run_id)
    assert before == [1], before  # stopped while held in epoch 2

    done = stack.compose("run", "--rm", "trainer", "train", "--resume", "auto", *args,
                         "--json", timeout=TRAIN_TIMEOUT_S)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == run_id, "the resumed run is not the stopped one"
    (run,) = stack.runs_of("e2e-stop")
    assert run["info"]["status"] == "FINISHED"
    assert _epochs_logged(stack, run_id) == [1, 2, 3, 4]


def test_database_restart_mid_run_loses_no_metric(stack: Stack) -> None:
    """The database goes away while a trainer logs epochs 2-4: the server answers with errors,
    the trainer's spool keeps every record, and replays them once the database is back."""
    name = f"{stack.project}-dbrestart"
    experiment = "e2e-db-restart"
    args = ["--experiment", experiment, "--run-name", experiment]
    # finish() waits for the server up to TINYTALE_TRACKING_WAIT_S: longer than the outage.
    _run_held_trainer(stack, name, *args, env=("-e", "TINYTALE_TRACKING_WAIT_S=300"))
    try:
        run_id = _wait_until_held_after_epoch_1(stack, name, experiment)
        stack.compose("stop", "db", timeout=120)
        subprocess.run(["docker", "exec", name, "touch", "/tmp/hold/release"], check=True,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 300
        while "cannot log to MLflow" not in (logs := subprocess.run(
                ["docker", "logs", name], capture_output=True, text=True,
                check=False).stderr):
            assert time.monotonic() < deadline, f"the trainer never missed the database\n{logs}"
            time.sleep(0.5)
        stack.compose("start", "db", timeout=120)
        code = int(subprocess.run(["docker", "wait", name], capture_output=True, text=True,
                                  check=True, timeout=TRAIN_TIMEOUT_S).stdout.strip())
        logs = subprocess.run(["docker", "logs", "--tail", "40", name], capture_output=True,
                              text=True, check=False).stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        stack.compose("start", "db", timeout=120, check=False)
    assert code == 0, f"the trainer exited {code}\n{logs}"
    (run,) = stack.runs_of(experiment)
    assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
    for key in ("train_loss", "val_loss"):
        history = stack.api("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        # Each epoch once: nothing lost while the database was down, nothing sent twice.
        assert sorted(m["step"] for m in history) == [1, 2, 3, 4], (key, history)


def test_sweep_launch_runs_points_in_containers(stack: Stack, tmp_path: Path) -> None:
    """`tinytale sweep --launch`: the host makes the parent run, each point is a container."""
    (tmp_path / "base.yaml").write_text(
        "model: {n_layer: 1, n_head: 2, n_embd: 32}\n"
        "tracking: {experiment: e2e-sweep, register: false, samples: 0}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "e2e-sweep", "base": "base.yaml", "set": {"train.epochs": 2},
        "grid": {"model.dropout": [0.0, 0.1]}}, sort_keys=False))
    argv = [sys.executable, "-m", "tinytale", "sweep", str(sweep), "--launch", "--device", "cpu",
            "--parallel", "2", "--json", "--tracking-uri", f"http://127.0.0.1:{stack.port}",
            "--out", str(tmp_path / "out")]

    def sweep_once() -> dict[str, Any]:
        done = subprocess.run(argv, cwd=REPO, env=stack.env, capture_output=True, text=True,
                              timeout=TRAIN_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = sweep_once()
    assert [p["status"] for p in result["points"]] == ["FINISHED", "FINISHED"], result
    runs = {r["info"]["run_id"]: r for r in stack.runs_of("e2e-sweep")}
    parent = runs.pop(result["parent_run_id"])
    assert parent["info"]["run_name"] == "e2e-sweep"
    assert len(runs) == 2
    for run in runs.values():
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == result["parent_run_id"]
        assert tags["tinytale.sweep"] == "e2e-sweep"
        assert run["info"]["status"] == "FINISHED"
        assert _epochs_logged(stack, run["info"]["run_id"]) == [1, 2]
    # Again: both points finished, so no container trains.
    again = sweep_once()
    assert [p["status"] for p in again["points"]] == ["SKIPPED", "SKIPPED"], again
    assert len(stack.runs_of("e2e-sweep")) == 3


def _artifact_listing(stack: Stack, run_id: str) -> list[str]:
    files = stack.api("artifacts/list", run_id=run_id).get("files", [])
    return sorted(f["path"] for f in files)


def test_backup_and_restore_of_the_stack(stack: Stack, tmp_path: Path) -> None:
    """The README's backup (pg_dump + a tar of the artifacts volume) and restore into a stack
    whose volumes were deleted: the runs, metrics, alias and artifacts are all back."""
    run_id = _finished_run(stack)["info"]["run_id"]
    artifacts = _artifact_listing(stack, run_id)
    assert artifacts, "the lesson run has artifacts to back up"
    dump, tarball = tmp_path / "mlflow.dump", tmp_path / "artifacts.tar"
    with open(dump, "wb") as out:
        subprocess.run(["docker", "compose", "--project-directory", str(REPO), "exec", "-T", "db",
                        "pg_dump", "--username", "mlflow", "--format", "custom", "mlflow"],
                       cwd=REPO, env=stack.env, stdout=out, check=True, timeout=300)
    with open(tarball, "wb") as out:
        subprocess.run(["docker", "compose", "--project-directory", str(REPO), "exec", "-T",
                        "mlflow", "tar", "-C", "/mlflow", "-c", "artifacts"],
                       cwd=REPO, env=stack.env, stdout=out, check=True, timeout=300)
    assert dump.stat().st_size > 0 and tarball.stat().st_size > 0

    stack.compose("down", "--volumes", timeout=300)  # everything gone
    stack.compose("up", "--detach", "--wait", "db", timeout=300)
    with open(dump, "rb") as source:
        subprocess.run(["docker", "compose", "--project-directory", str(REPO), "exec", "-T", "db",
                        "pg_restore", "--username", "mlflow", "--dbname", "mlflow",
                        "--no-owner"], cwd=REPO, env=stack.env, stdin=source, check=True,
                       timeout=300)
    with open(tarball, "rb") as source:
        subprocess.run(["docker", "compose", "--project-directory", str(REPO), "run", "--rm",
                        "--no-deps", "-T", "--entrypoint", "tar", "mlflow", "-C", "/mlflow",
                        "-x"], cwd=REPO, env=stack.env, stdin=source, check=True, timeout=300)
    stack.compose("up", "--detach", "--wait", "mlflow", timeout=300)
    assert _finished_run(stack)["info"]["run_id"] == run_id
    assert len(_epochs_logged(stack, run_id)) == _lesson_epochs()
    assert _registered_champion(stack) == run_id
    assert _artifact_listing(stack, run_id) == artifacts


def test_down_with_volumes_resets_everything(stack: Stack) -> None:
    """`docker compose down -v` (the README's reset) removes the project's named volumes."""
    def volumes() -> list[str]:
        return subprocess.run(
            ["docker", "volume", "ls", "--quiet", "--filter",
             f"label=com.docker.compose.project={stack.project}"],
            capture_output=True, text=True, check=True).stdout.split()

    # mlflow-postgres, mlflow-db, mlflow-artifacts, checkpoints
    assert len(volumes()) == 4, volumes()
    stack.compose("down", "--volumes", timeout=300)
    assert volumes() == []


def test_gpu_profile_config_is_valid(docker_env: dict[str, str]) -> None:
    """The CUDA service validates and asks for GPUs; running it needs an NVIDIA host."""
    done = subprocess.run(
        [
            "docker",
            "compose",
            "--project-directory",
            str(REPO),
            "--profile",
            "gpu",
            "config",
            "--format",
            "json",
        ],
        cwd=REPO,
        env=docker_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    service = json.loads(done.stdout)["services"]["trainer-gpu"]
    assert service["build"]["target"] == "cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices), devices
    # One DDP process per visible GPU; the arguments of `run trainer-gpu ...` follow `-m tinytale`.
    entrypoint = service["entrypoint"]
    start = entrypoint.index("torchrun")
    assert entrypoint[start:] == [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "gpu",
        "-m",
        "tinytale",
    ], entrypoint
    assert service["command"][:2] == ["train", "experiments/lesson.yaml"]
    assert int(service["shm_size"]) >= 1 << 30, "NCCL needs more than the default 64 MB /dev/shm"


@pytest.fixture(scope="module")
def auth_stack(
    docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """The server alone with TINYTALE_MLFLOW_AUTH=1 and the password in a secret file."""
    password = f"e2e-{uuid.uuid4().hex}"
    secret = tmp_path_factory.mktemp("secret") / "mlflow-admin-password"
    secret.write_text(password + "\n")
    secret.chmod(0o644)  # bind-mounted as is: uid 10001 in the containers must read it
    port = free_port()
    project = f"tinytale-e2e-auth-{os.getpid()}"
    env = {
        **docker_env,
        "COMPOSE_PROJECT_NAME": project,
        "TINYTALE_MLFLOW_PORT": str(port),
        "TINYTALE_MLFLOW_AUTH": "1",
        "TINYTALE_MLFLOW_ADMIN_PASSWORD_FILE": str(secret),
    }
    env.pop("TINYTALE_MLFLOW_ADMIN_PASSWORD", None)
    stack = Stack(project, port, env, {})
    try:
        start = time.monotonic()
        # The images are the ones the `stack` fixture built (cached when it ran first).
        stack.compose("up", "--detach", "--wait", "--build", "mlflow", timeout=BUILD_TIMEOUT_S)
        stack.timings["auth_up_s"] = time.monotonic() - start
        yield stack, password
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)
        print(f"\ndocker e2e auth timings: {stack.timings}")


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_auth_refuses_anonymous_requests_and_the_trainer_logs_in(
    auth_stack: tuple[Stack, str],
) -> None:
    stack, password = auth_stack
    base = f"http://127.0.0.1:{stack.port}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(f"{base}/health") == 200  # what the healthcheck calls
    assert _status(search) == 401
    assert _status(search, ("admin", "password1234")) == 401
    assert _status(search, ("admin", password)) == 200
    # The trainer container gets the password from the same secret file, through its entrypoint.
    probe = "import mlflow; print(len(mlflow.MlflowClient().search_experiments()), 'experiments')"
    done = stack.compose(
        "run",
        "--rm",
        "--no-deps",
        "--entrypoint",
        '/bin/sh /usr/local/bin/tinytale-entrypoint python -c "' + probe + '"',
        "trainer",
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and "experiments" in done.stdout, done.stdout + done.stderr


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


@pytest.mark.skipif(
    not IN_CI and os.environ.get("TINYTALE_E2E_CUDA") != "1",
    reason="the cuda image is ~7 GB (3 GB of CUDA wheels); CI=true or TINYTALE_E2E_CUDA=1 "
    "builds it",
)
def test_cuda_image_builds_and_runs_on_the_cpu(docker_env: dict[str, str]) -> None:
    """The cuda target built as users build it; no GPU here, so the image runs on the CPU.

    Last in this file: it needs the largest downloads and image. Offline, the CUDA wheels come
    from the script's wheels-cuda step (TINYTALE_E2E_ONLINE=1: from PyPI inside the build).
    What needs a GPU (CUDA kernels, NCCL, `--nproc_per_node gpu`) cannot run here.
    """
    if os.environ.get("TINYTALE_E2E_ONLINE") != "1":
        done = _run(["bash", str(SETUP_SCRIPT), "wheels-cuda"], docker_env, BUILD_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-4000:]
    compose = ["docker", "compose", "--project-directory", str(REPO), "--profile", "gpu"]
    done = _run([*compose, "build", "trainer-gpu"], docker_env, BUILD_TIMEOUT_S * 2)
    assert done.returncode == 0, done.stderr[-4000:]
    config = _run([*compose, "config", "--format", "json"], docker_env, 60)
    assert config.returncode == 0, config.stderr
    image = json.loads(config.stdout)["services"]["trainer-gpu"]["image"]

    # The build's own check passed; ask the image again, and that NVML's bindings are there.
    probe = ("import torch, pynvml; "
             "print(torch.__version__, torch.version.cuda, torch.cuda.is_available())")
    done = _run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe],
                docker_env, 300)
    assert done.returncode == 0, done.stderr[-4000:]
    version, cuda, available = done.stdout.split()
    assert cuda != "None" and "+cu" in version, done.stdout
    assert available == "False"  # no GPU on this machine: the CPU checks below are all we can do

    # The service's own entrypoint (secret file -> torchrun -> tinytale), with 2 CPU processes
    # and gloo instead of one per GPU: the image's DDP path trains and rank 0 checkpoints.
    done = _run(["docker", "run", "--rm", "--entrypoint", "/bin/sh", image,
                 "/usr/local/bin/tinytale-entrypoint", "torchrun", "--standalone",
                 "--nproc_per_node", "2", "-m", "tinytale", "train", "--device", "cpu",
                 "--no-tracking", "--json", "--set", "train.epochs=2"], docker_env, 600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["epochs"] == 2, summary
    assert summary["checkpoint"].startswith("/app/runs/"), summary
