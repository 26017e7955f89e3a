"""`tinytale launch`: the compose commands it builds, the device it picks, the errors it gives.

No Docker engine is needed: the commands are checked as argument lists, and the runs of
`launch()` use a stand-in `docker` executable on PATH that records its arguments (a real engine
is exercised by tests/test_docker_e2e.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tinytale.launch import (
    CONTAINER_CONFIG_DIR,
    LaunchError,
    check_docker,
    launch,
    launch_commands,
    pick_device,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
COMPOSE = [
    "docker",
    "compose",
    "--project-directory",
    str(REPO),
    "--file",
    str(REPO / "compose.yaml"),
]


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
