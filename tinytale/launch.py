"""`tinytale launch`: run one training in the compose stack's CPU or CUDA trainer container.

Typer-free and mostly pure: `launch_commands()` returns the `docker compose` argument lists, so the
tests can check them without Docker; `launch()` checks Docker, picks the device and runs them.
`tinytale sweep --launch` builds its per-point commands from the same pieces (`prepare_stack`,
`server_command`, `train_command`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinytale.config import split_override
from tinytale.errors import UserError

# The --device values a trainer container takes (no mps: containers run on Linux).
CONTAINER_DEVICES = ("auto", "cpu", "cuda")
SERVICES = {"cpu": "trainer", "cuda": "trainer-gpu"}
COMPOSE_FILE = "compose.yaml"
# Where a config file from the host appears inside the trainer container (mounted read-only).
CONTAINER_CONFIG_DIR = "/app/launch"


class LaunchError(UserError):
    """A problem the user can fix (no Docker, bad option); the message is one sentence."""


@dataclass(frozen=True)
class ConfigMount:
    """A host file given as CONFIG, mounted into the container because the image cannot see it."""

    host_path: Path
    container_path: str

    @property
    def volume(self) -> str:
        return f"{self.host_path}:{self.container_path}:ro"


def resolve_config(config: str, cwd: Path) -> tuple[str, ConfigMount | None]:
    """The CONFIG argument as the container sees it, and the mount that makes it visible.

    An existing host file is mounted, so edits need no image rebuild; anything else (a path
    inside the image such as experiments/lesson.yaml when run elsewhere) is passed unchanged.
    """
    host_path = Path(config).expanduser()
    if not host_path.is_absolute():
        host_path = cwd / host_path
    if not host_path.is_file():
        return config, None
    mount = ConfigMount(host_path.resolve(), f"{CONTAINER_CONFIG_DIR}/{host_path.name}")
    return mount.container_path, mount


def check_overrides(overrides: Sequence[str]) -> None:
    """Each is KEY=VALUE; the keys and values are the container's to check (it reads the
    config), so a mistake there is reported once, by the trainer."""
    for item in overrides:
        if split_override(item) is None:
            raise LaunchError(f"--set {item!r} is not KEY=VALUE, e.g. --set train.lr=3e-4.")


def host_tracking_uri() -> str:
    """The stack's MLflow server as the host reaches it (containers use http://mlflow:5000)."""
    return f"http://127.0.0.1:{os.environ.get('TINYTALE_MLFLOW_PORT') or 5000}"


def _compose(device: str, project_dir: Path) -> list[str]:
    if device not in SERVICES:
        raise LaunchError(f"device {device!r} is not one of: cpu, cuda.")
    compose = ["docker", "compose", "--project-directory", str(project_dir),
               "--file", str(project_dir / COMPOSE_FILE)]
    if device == "cuda":
        compose += ["--profile", "gpu"]
    return compose


def server_command(device: str, project_dir: Path = Path("."), build: bool = False) -> list[str]:
    """Start the MLflow service (if it is not up) and wait until it is healthy."""
    return [*_compose(device, project_dir), "up", "--detach", "--wait",
            *(["--build"] if build else []), "mlflow"]


def train_command(
    config: str,
    device: str,
    train_args: Sequence[str] = (),
    project_dir: Path = Path("."),
    mount: ConfigMount | None = None,
    env: Mapping[str, str] | None = None,
    detach: bool = False,
    build: bool = False,
    no_tty: bool = False,
) -> list[str]:
    """`docker compose run --rm ... SERVICE train CONFIG ARGS...`, a one-off trainer container.

    `env` becomes `--env KEY=VALUE` options (the container sees no other host variables);
    `no_tty` keeps the container's stdout and stderr apart for a caller that reads them.
    """
    run = [*_compose(device, project_dir), "run", "--rm"]
    if build:
        run.append("--build")
    if detach:
        run.append("--detach")
    if no_tty:
        run.append("--no-TTY")
    if mount is not None:
        run += ["--volume", mount.volume]
    for key, value in (env or {}).items():
        run += ["--env", f"{key}={value}"]
    return [*run, SERVICES[device], "train", config, *train_args]


def launch_commands(
    config: str,
    device: str,
    overrides: Sequence[str] = (),
    detach: bool = False,
    build: bool = False,
    project_dir: Path = Path("."),
    mount: ConfigMount | None = None,
) -> list[list[str]]:
    """The `docker compose` commands for one run: start the server and wait, then train.

    `device` must already be `cpu` or `cuda` (see `pick_device` for `auto`); `config` is the
    path the container sees.
    """
    check_overrides(overrides)
    return [
        server_command(device, project_dir, build),
        train_command(config, device, [arg for item in overrides for arg in ("--set", item)],
                      project_dir, mount, detach=detach, build=build),
    ]


def has_nvidia_runtime(docker_info_runtimes: str) -> bool:
    """Whether `docker info --format '{{json .Runtimes}}'` output lists the NVIDIA runtime."""
    try:
        runtimes = json.loads(docker_info_runtimes or "{}")
    except json.JSONDecodeError:
        return False
    return isinstance(runtimes, dict) and "nvidia" in runtimes


def check_device(device: str) -> None:
    if device not in CONTAINER_DEVICES:
        raise LaunchError(f"--device {device!r} is not one of: {', '.join(CONTAINER_DEVICES)}.")


def pick_device(device: str, docker_info_runtimes: str) -> str:
    check_device(device)
    if device != "auto":
        return device
    return "cuda" if has_nvidia_runtime(docker_info_runtimes) else "cpu"


def find_project_dir(cwd: Path) -> Path:
    """The folder holding tinytale's compose.yaml: this checkout's root, else cwd or a parent."""
    candidates = [Path(__file__).resolve().parents[1], cwd, *cwd.parents]
    for folder in candidates:
        if (folder / COMPOSE_FILE).is_file() and (folder / "docker" / "Dockerfile").is_file():
            return folder
    raise LaunchError(
        f"No tinytale {COMPOSE_FILE} found in {cwd} or its parents: run this from the tinytale "
        "checkout."
    )


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)


def check_docker() -> str:
    """Fail with one sentence when Docker cannot run the stack; return the engine's runtimes."""
    if shutil.which("docker") is None:
        raise LaunchError(
            "The docker command is not installed: install Docker (or run scripts/docker-offline.sh "
            "on Debian), or train without containers with `tinytale train`."
        )
    info = _docker("info", "--format", "{{json .Runtimes}}")
    if info.returncode != 0:
        raise LaunchError(
            "The Docker engine is not running or not reachable (`docker info` failed): start it, "
            "or train without containers with `tinytale train`."
        )
    if _docker("compose", "version").returncode != 0:
        raise LaunchError(
            "Docker Compose v2 is missing (`docker compose version` failed): install the compose "
            "plugin (scripts/docker-offline.sh does on Debian)."
        )
    return info.stdout.strip()


def _run(argv: list[str]) -> int:
    """Run and wait, also after Ctrl-C: compose passes it on and the trainer saves a checkpoint."""
    process = subprocess.Popen(argv)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue


@dataclass(frozen=True)
class Stack:
    """A compose stack Docker can run, and the device (`cpu` or `cuda`) its trainer uses."""

    project_dir: Path
    device: str


def prepare_stack(device: str = "auto", project_dir: Path | None = None) -> Stack:
    """Find compose.yaml, check Docker, resolve `auto`; `LaunchError` when any of it fails."""
    check_device(device)
    project_dir = project_dir or find_project_dir(Path.cwd())
    if not (project_dir / COMPOSE_FILE).is_file():
        raise LaunchError(f"{project_dir / COMPOSE_FILE} does not exist.")
    runtimes = check_docker()
    return Stack(project_dir, pick_device(device, runtimes))


def launch(
    config: str = "experiments/lesson.yaml",
    device: str = "auto",
    overrides: Sequence[str] = (),
    detach: bool = False,
    build: bool = False,
    project_dir: Path | None = None,
) -> int:
    """Train CONFIG in the compose stack (the server is started first); the exit code of the run.

    Raises `LaunchError` when Docker is missing or an option is wrong.
    """
    check_overrides(overrides)
    stack = prepare_stack(device, project_dir)
    container_config, mount = resolve_config(config, Path.cwd())
    commands = launch_commands(
        container_config,
        stack.device,
        overrides,
        detach=detach,
        build=build,
        project_dir=stack.project_dir,
        mount=mount,
    )
    for argv in commands:
        code = _run(argv)
        if code != 0:
            return code
    for line in read_back_commands(*_tracking_names(config, overrides, stack.project_dir)):
        print(line, file=sys.stderr, flush=True)
    return 0


def _tracking_names(config: str, overrides: Sequence[str], project_dir: Path
                    ) -> tuple[str, str]:
    """The MLflow experiment and registered model of the launched run, read from the config
    where the host can see it; the defaults when it cannot."""
    from tinytale.config import load_config

    for candidate in (Path(config), project_dir / config):
        if candidate.is_file():
            try:
                tracking = load_config(candidate, list(overrides)).tracking
                return tracking.experiment, tracking.registered_model
            except UserError:
                break  # the container reports a bad config itself
    return "tinytale", "tinytale"


def read_back_commands(experiment: str, model: str = "tinytale") -> list[str]:
    """What to type on the host to see a launched run: the stack's server, not ./mlflow.db."""
    uri = host_tracking_uri()
    return [
        f"the run is on the stack's MLflow server, {uri}; from this host:",
        f"  tinytale runs --experiment {experiment} --tracking-uri {uri}",
        f"  tinytale compare --experiment {experiment} --tracking-uri {uri}",
        f"  tinytale generate models:/{model}@champion --tracking-uri {uri}",
        f"  UI: {uri}/#/experiments?workflowType=machine_learning",
    ]
