"""scripts/docker-offline.sh, the parts that can run without touching this machine's engine.

The engine step is run against stand-ins for `docker` and `dockerd` on PATH (shell scripts in
tmp_path): the real engine cannot be stopped and restarted in the middle of a test session
that other tests share. Everything else is real: the script, bash, setsid and the pipes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "docker-offline.sh"

FAKE_DOCKER = """#!/bin/sh
# `docker info` answers once the stand-in dockerd has started.
case "$1" in
    info) test -e "$STATE/started" ;;
    version) echo "server stand-in" ;;
    *) exit 1 ;;
esac
"""

# Like the real daemon: starts, then runs until it is stopped. It writes to stdout, which
# docker-offline.sh must point at its log, not at its own stdout.
FAKE_DOCKERD = """#!/bin/sh
echo $$ > "$STATE/pid"
touch "$STATE/started"
echo "stand-in dockerd running"
exec sleep 600
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine step starts dockerd as root")
def test_engine_start_does_not_hold_the_callers_pipe(tmp_path: Path) -> None:
    """`exports=$(docker-offline.sh)` must return once the engine answers.

    scripts/test.sh reads the script's stdout that way. A dockerd that inherits that stdout
    keeps the pipe open for as long as it runs, and the caller waits forever (a CI run once
    spent its whole 90 minutes there).
    """
    bin_dir = tmp_path / "bin"
    state = tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in {"docker": FAKE_DOCKER, "dockerd": FAKE_DOCKERD}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "dockerd.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STATE": str(state),
        "TINYTALE_DOCKERD_LOG": str(log),
    }
    try:
        done = subprocess.run(
            ["bash", "-c", f'out=$(bash "{SCRIPT}" engine env) && printf "%s" "$out"'],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "export TINYTALE_BASE_IMAGE=" in done.stdout
        assert "engine: starting dockerd" in done.stderr
        assert "server stand-in" in done.stderr
        # The daemon is still running, detached, and its output went to the log.
        pid = int((state / "pid").read_text())
        os.kill(pid, 0)
        assert "stand-in dockerd running" in log.read_text()
    finally:
        if (state / "pid").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((state / "pid").read_text()), signal.SIGTERM)


def test_unknown_step_is_one_error_line() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "engines"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "[docker-offline] ERROR: unknown step 'engines' "
        "(steps: engine compose base postgres wheels wheels-cuda env)"
    ]
