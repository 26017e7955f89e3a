"""`tinytale launch` and `tinytale sweep --launch`: the compose commands they build, the device
they pick, the errors they give.

No Docker engine is needed: the commands are checked as argument lists, and the runs of
`launch()` and of launched sweeps use a stand-in `docker` executable on PATH that records its
arguments (a real engine is exercised by tests/e2e/test_docker_e2e.py).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from support.configs import TINY
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.errors import UserError
from tinytale.launch import (
    CONTAINER_CONFIG_DIR,
    LaunchError,
    Stack,
    check_docker,
    launch,
    launch_commands,
    pick_device,
    resolve_config,
)
from tinytale.sweep.containers import ContainerPoints, stack_tracking_uri

REPO = Path(__file__).resolve().parents[2]
COMPOSE = [
    "docker",
    "compose",
    "--project-directory",
    str(REPO),
    "--file",
    str(REPO / "compose.yaml"),
]
runner = CliRunner()


def test_cpu_run_starts_the_server_then_trains() -> None:
    up, run = launch_commands(
        "experiments/lesson.yaml", "cpu", ["train.epochs=2"], project_dir=REPO
    )
    assert up == [*COMPOSE, "up", "--detach", "--wait", "mlflow"]
    assert run == [
        *COMPOSE,
        "run",
        "--rm",
        "trainer",
        "train",
        "experiments/lesson.yaml",
        "--set",
        "train.epochs=2",
    ]


def test_cuda_run_uses_the_gpu_service_and_profile() -> None:
    _, run = launch_commands("x.yaml", "cuda", project_dir=REPO)
    assert run[len(COMPOSE) : len(COMPOSE) + 2] == ["--profile", "gpu"]
    assert run[-3:] == ["trainer-gpu", "train", "x.yaml"]


def test_detach_and_build_flags() -> None:
    up, run = launch_commands("x.yaml", "cpu", detach=True, build=True, project_dir=REPO)
    assert "--build" in up
    assert run[len(COMPOSE) :] == [
        "run",
        "--rm",
        "--build",
        "--detach",
        "trainer",
        "train",
        "x.yaml",
    ]


def test_every_override_becomes_one_set_option() -> None:
    _, run = launch_commands("x.yaml", "cpu", ["a.b=1", "c.d=x=y"], project_dir=REPO)
    assert run[-4:] == ["--set", "a.b=1", "--set", "c.d=x=y"]


@pytest.mark.parametrize("bad", ["train.lr", "=3", ""])
def test_an_override_without_key_and_value_is_refused(bad: str) -> None:
    with pytest.raises(LaunchError, match="KEY=VALUE"):
        launch_commands("x.yaml", "cpu", [bad], project_dir=REPO)


def test_a_host_config_file_is_mounted_read_only(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("train: {epochs: 1}\n")
    path, mount = resolve_config("mine.yaml", cwd=tmp_path)
    assert path == f"{CONTAINER_CONFIG_DIR}/mine.yaml"
    assert mount is not None and mount.volume == f"{config}:{path}:ro"
    _, run = launch_commands(path, "cpu", project_dir=REPO, mount=mount)
    assert run[run.index("--volume") + 1] == mount.volume


def test_a_config_not_on_the_host_is_passed_to_the_container_unchanged(tmp_path: Path) -> None:
    assert resolve_config("experiments/other.yaml", cwd=tmp_path) == (
        "experiments/other.yaml",
        None,
    )


@pytest.mark.parametrize(
    ("runtimes", "expected"),
    [
        (
            '{"io.containerd.runc.v2":{"path":"runc"},"nvidia":{"path":"nvidia-container-runtime"}}',
            "cuda",
        ),
        ('{"io.containerd.runc.v2":{"path":"runc"},"runc":{"path":"runc"}}', "cpu"),
        ("", "cpu"),
        ("not json", "cpu"),
    ],
)
def test_auto_picks_cuda_only_with_the_nvidia_runtime(runtimes: str, expected: str) -> None:
    assert pick_device("auto", runtimes) == expected


def test_an_explicit_device_wins_over_the_runtimes() -> None:
    assert pick_device("cuda", "{}") == "cuda"
    assert pick_device("cpu", '{"nvidia":{}}') == "cpu"
    with pytest.raises(LaunchError, match="--device 'tpu'"):
        pick_device("tpu", "{}")


def _fake_docker(bin_dir: Path, script: str) -> None:
    """A `docker` executable for PATH: logs each call's arguments, then runs `script`."""
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$*" >> "{bin_dir}/calls"\n{script}\n')
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)


def _path_with(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    # Only the stand-in and the basic tools it needs: a real docker must not be found.
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")


def test_no_docker_command_is_one_clear_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="docker command is not installed"):
        check_docker()


def test_no_engine_is_one_clear_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_docker(tmp_path, 'echo "Cannot connect to the Docker daemon" >&2; exit 1')
    _path_with(monkeypatch, tmp_path)
    with pytest.raises(LaunchError, match="engine is not running"):
        launch("experiments/lesson.yaml", project_dir=REPO)


def test_no_compose_plugin_is_one_clear_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_docker(tmp_path, '[ "$1" = compose ] && exit 1; echo "{}"')
    _path_with(monkeypatch, tmp_path)
    with pytest.raises(LaunchError, match="Compose v2 is missing"):
        check_docker()


def test_launch_runs_server_then_trainer_and_returns_the_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    # `info` reports the NVIDIA runtime, so `auto` picks CUDA; `run` exits like a failed run.
    _fake_docker(bin_dir, 'case "$*" in info*) echo \'{"nvidia":{}}\';; *" run "*) exit 3;; esac')
    _path_with(monkeypatch, bin_dir)
    monkeypatch.chdir(tmp_path)
    code = launch(
        "experiments/lesson.yaml", "auto", ["train.epochs=1"], detach=True, project_dir=REPO
    )
    assert code == 3
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls[-2].endswith("up --detach --wait mlflow")
    assert calls[-1].endswith(
        "run --rm --detach trainer-gpu train experiments/lesson.yaml --set train.epochs=1"
    )


def test_launch_stops_when_the_server_does_not_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_docker(bin_dir, 'case "$*" in info*) echo "{}";; *" up "*) exit 1;; esac')
    _path_with(monkeypatch, bin_dir)
    monkeypatch.chdir(tmp_path)
    assert launch("x.yaml", "cpu", project_dir=REPO) == 1
    assert not any(" run " in c for c in (bin_dir / "calls").read_text().splitlines())


def test_a_project_without_compose_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="compose.yaml does not exist"):
        launch("x.yaml", "cpu", project_dir=tmp_path)


# --------------------------------------------------------------------------- sweep --launch

# A stand-in for `docker` that runs `compose run ... trainer train ARGS` as a local
# `tinytale train` with only what a container would have: compose's environment (the
# tracking URI `http://mlflow:5000` becomes the test's server), the `--env` options, the
# mounted config at its host path and /app/runs in a folder of the test. The real containers
# are exercised by tests/e2e/test_docker_e2e.py.
FAKE_CONTAINER_DOCKER = r'''#!{python}
import json, os, sys

here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as calls:
    calls.write(json.dumps(args) + "\n")
if args[:1] == ["info"]:
    print(os.environ.get("FAKE_DOCKER_RUNTIMES", "{{}}"))
    sys.exit(0)
if "run" not in args:
    sys.exit(0)  # compose version, up --wait mlflow
rest = args[args.index("run") + 1:]
env = {{"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": os.environ["FAKE_DOCKER_PYTHONPATH"],
        "MLFLOW_TRACKING_URI": os.environ["FAKE_DOCKER_MLFLOW"],
        "TINYTALE_OUT": os.environ["FAKE_DOCKER_APP_RUNS"],
        "TINYTALE_TRACKING_FLUSH_S": "0.5"}}
mounts = {{}}
while rest[0].startswith("-"):
    option = rest.pop(0)
    if option == "--env":
        key, _, value = rest.pop(0).partition("=")
        env[key] = value
    elif option == "--volume":
        host, container, _ = rest.pop(0).split(":")
        mounts[container] = host
service, command, *train = rest
assert command == "train", rest
train = [mounts.get(a, a).replace("/app/runs", os.environ["FAKE_DOCKER_APP_RUNS"])
         for a in train]
os.execve(sys.executable, [sys.executable, "-m", "tinytale", "train", *train], env)
'''


def _fake_container_docker(bin_dir: Path) -> Path:
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(FAKE_CONTAINER_DOCKER.format(python=sys.executable))
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    return bin_dir / "calls.jsonl"


def _calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_launched_sweep_runs_points_in_containers_nested_under_the_host_parent(
    mlflow_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    calls_file = _fake_container_docker(tmp_path / "bin")
    _path_with(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv("FAKE_DOCKER_PYTHONPATH", str(REPO))
    monkeypatch.setenv("FAKE_DOCKER_MLFLOW", mlflow_server.url)
    monkeypatch.setenv("FAKE_DOCKER_APP_RUNS", str(tmp_path / "volume"))
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "tiny.yaml"
    base.write_text("tracking:\n  experiment: sweep-launch\n  register: false\n")
    tiny = {k: yaml.safe_load(v) for k, v in (o.split("=") for o in TINY)}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "boxed", "base": "tiny.yaml",
        "set": tiny | {"train.epochs": 2, "data.n_stories": 60, "tracking.samples": 0,
                       "train.num_threads": 1, "train.warmup_steps": 0},
        "grid": {"model.dropout": [0.0, 0.1]},
        # Starts, then its weights overflow at step 1 on any CPU (AdamW's decay factor
        # 1 - lr * weight_decay is about -3e297) and step 2's loss is NaN: it exits 1.
        "points": [{"train.weight_decay": 1e300}],
    }, sort_keys=False))
    args = ["sweep", str(sweep), "--launch", "--device", "cpu", "--parallel", "2", "--json",
            "--tracking-uri", mlflow_server.url, "--out", str(tmp_path / "host")]

    first = runner.invoke(app, args)
    assert first.exit_code == 1, first.output
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in result["points"]] == ["FINISHED", "FINISHED", "FAILED"]
    assert "non-finite" in result["points"][2]["error"]

    calls = _calls(calls_file)
    compose = ["compose", "--project-directory", str(REPO), "--file", str(REPO / "compose.yaml")]
    assert calls[0][0] == "info"
    # The server is up before the host creates the parent run; each point is one `run`.
    assert calls[2] == [*compose, "up", "--detach", "--wait", "mlflow"]
    runs = [c for c in calls if "run" in c]
    assert len(runs) == 3
    parent_id = result["parent_run_id"]
    for argv, point in zip(sorted(runs, key=lambda c: c[c.index("--run-name") + 1]),
                           sorted(result["points"], key=lambda p: p["run_name"]), strict=True):
        assert argv[:len(compose) + 3] == [*compose, "run", "--rm", "--no-TTY"]
        assert _option_values(argv, "--volume") == [f"{base}:/app/launch/tiny.yaml:ro"]
        env = dict(e.split("=", 1) for e in _option_values(argv, "--env"))
        assert env["TINYTALE_PARENT_RUN_ID"] == parent_id
        assert json.loads(env["TINYTALE_RUN_TAGS"]) == {
            "tinytale.sweep": "boxed", "tinytale.overrides": json.dumps(point["overrides"])}
        assert argv[argv.index("trainer"):][:3] == ["trainer", "train", "/app/launch/tiny.yaml"]
        assert argv[argv.index("--run-name") + 1] == point["run_name"]
        assert argv[argv.index("--out") + 1].startswith("/app/runs/boxed/")
        assert argv[argv.index("--resume") + 1] == "auto"
        assert "--tracking-uri" not in argv  # the container's own: http://mlflow:5000

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "boxed" and parent.info.status == "FAILED"
    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert set(children) == {"dropout=0", "dropout=0.1", "weight_decay=1e+300"}
    assert children["dropout=0.1"].info.status == "FINISHED"
    assert children["dropout=0.1"].data.tags["tinytale.sweep"] == "boxed"
    failed = children["weight_decay=1e+300"]
    # The container's own run, closed FAILED by the trainer (not a record made by the host).
    assert failed.info.status == "FAILED" and \
        failed.data.params["train.weight_decay"] == "1e+300"
    assert failed.info.run_id == result["points"][2]["run_id"]
    assert (tmp_path / "host" / "boxed" / "logs" / "dropout=0.1.log").is_file()

    # Again: the finished points are skipped without a container, the failed one runs again.
    second = runner.invoke(app, args)
    assert second.exit_code == 1, second.output
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert [p["status"] for p in again["points"]] == ["SKIPPED", "SKIPPED", "FAILED"]
    assert again["parent_run_id"] == parent_id
    new_runs = [c for c in _calls(calls_file)[len(calls):] if "run" in c]
    assert [c[c.index("--run-name") + 1] for c in new_runs] == ["weight_decay=1e+300"]


def test_launched_sweep_without_docker_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "base.yaml").write_text("train: {epochs: 1}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: base.yaml\npoints: [{model.dropout: 0.1}]\n")
    result = runner.invoke(app, ["sweep", str(sweep), "--launch"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: The docker command is not installed")


def test_device_without_launch_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sweep", str(tmp_path / "s.yaml"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda applies to containers only; add --launch" in result.stderr


def test_a_launched_sweep_talks_to_the_stack_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYTALE_MLFLOW_PORT", raising=False)
    assert stack_tracking_uri(None) == "http://127.0.0.1:5000"
    monkeypatch.setenv("TINYTALE_MLFLOW_PORT", "5001")
    assert stack_tracking_uri("") == "http://127.0.0.1:5001"
    assert stack_tracking_uri("http://gpu-box:5000") == "http://gpu-box:5000"
    with pytest.raises(UserError, match="cannot be used; leave it unset for http://127.0.0.1:5001"):
        stack_tracking_uri("sqlite:///mlflow.db")


def test_a_cuda_point_command(tmp_path: Path) -> None:
    points = ContainerPoints(Stack(REPO, "cuda"), "http://127.0.0.1:5000", "experiments/x.yaml",
                             None)
    assert points.command(["--json"], {"A": "1"}) == [
        *COMPOSE, "--profile", "gpu", "run", "--rm", "--no-TTY", "--env", "A=1",
        "trainer-gpu", "train", "experiments/x.yaml", "--json"]
    assert points.point_out("s", "abc123") == "/app/runs/s/abc123"
