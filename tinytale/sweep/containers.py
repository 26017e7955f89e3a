"""Sweep points in the compose stack's trainer containers (`tinytale sweep --launch`).

The host keeps the bookkeeping (parent run, skipping, failure records) and talks to the stack's
MLflow server through its published port; each point is a `docker compose run` of the trainer
service, which reaches the same server as http://mlflow:5000. What a local point gets from its
environment (parent run id, run tags, thread counts) reaches the container as `--env` options.
"""

from __future__ import annotations

import subprocess
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinytale.errors import UserError
from tinytale.launch import (
    ConfigMount,
    LaunchError,
    Stack,
    host_tracking_uri,
    prepare_stack,
    resolve_config,
    server_command,
    train_command,
)

# TINYTALE_OUT in the trainer image: the `checkpoints` volume.
CONTAINER_OUT = "/app/runs"


@dataclass(frozen=True)
class ContainerPoints:
    """How to run sweep points in the stack: its device, the base config as containers see it."""

    stack: Stack
    tracking_uri: str  # the stack's server as the host reaches it
    config: str
    mount: ConfigMount | None

    def point_out(self, sweep: str, config_hash: str | None) -> str:
        """The point's --out in the container: one folder per config, so `--resume auto` only
        ever finds a checkpoint trained with the point's current config."""
        return f"{CONTAINER_OUT}/{sweep}/{config_hash or 'unknown-config'}"

    def command(self, train_args: Sequence[str], env: Mapping[str, str]) -> list[str]:
        return train_command(self.config, self.stack.device, train_args,
                             self.stack.project_dir, self.mount, env=env, no_tty=True)


def stack_tracking_uri(tracking_uri: str | None) -> str:
    """The server the host uses for a launched sweep: given, else the stack's published port.

    It must be the stack's own server (the containers log to it as mlflow:5000), so a local
    store cannot be it.
    """
    uri = (tracking_uri or "").strip()
    if not uri:
        return host_tracking_uri()
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        raise UserError(f"--launch runs the points against the compose stack's MLflow server, "
                        f"so the tracking URI '{uri}' (also read from MLFLOW_TRACKING_URI) "
                        f"cannot be used; leave it unset for {host_tracking_uri()} or pass "
                        "the stack server's http:// address.")
    return uri


def prepare_containers(base: Path, device: str, tracking_uri: str | None,
                       project_dir: Path | None = None) -> ContainerPoints:
    """Check Docker, start the stack's MLflow server and wait for it; `UserError` on failure."""
    uri = stack_tracking_uri(tracking_uri)
    stack = prepare_stack(device, project_dir)
    argv = server_command(stack.device, stack.project_dir)
    # Compose's progress goes to stderr (fd 2): stdout may carry the sweep's --json.
    code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=2,
                          check=False).returncode
    if code != 0:
        raise LaunchError(f"the compose stack's MLflow server did not start (`{' '.join(argv)}` "
                          f"exited {code}); see `docker compose logs mlflow`.")
    config, mount = resolve_config(str(base), Path.cwd())
    return ContainerPoints(stack, uri, config, mount)
