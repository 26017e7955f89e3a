"""Hold a real `tinytale train` process at a chosen micro-batch, so that a signal or an outage
lands while training still has work to do on any machine, however fast it trains.

    env = hold_env(tmp_path / "hold", epoch=2, batch=3)   # for subprocess.Popen(..., env=env)
    wait_held(tmp_path / "hold", proc)                    # the loop is waiting at (2, 3)
    proc.send_signal(signal.SIGTERM)                      # tinytale's handler lets it go on
    release(tmp_path / "hold")                            # ... or go on without a signal

Waiting for "epoch >= 2 in last.pt" and then signalling races the trainer: a fast machine (or
a slow test process) finishes the run first. The held process cannot move until the test
has acted; tests/hold/sitecustomize.py says how.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

HOLD_DIR = Path(__file__).resolve().parents[1] / "hold"


def hold_env(folder: Path, epoch: int, batch: int,
             env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the hold at micro-batch `batch` of `epoch`."""
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if env is None else env)
    path = os.pathsep.join(p for p in (str(HOLD_DIR), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path, "TINYTALE_TEST_HOLD": f"{epoch}:{batch}",
            "TINYTALE_TEST_HOLD_DIR": str(folder)}


def wait_held(folder: Path, proc: subprocess.Popen, count: int = 1,
              timeout_s: float = 120) -> None:
    """Until `count` processes are held (torchrun's ranks: 2), while `proc` runs."""
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob("held-*"))) < count:
        if proc.poll() is not None:
            raise AssertionError(f"exit {proc.returncode} before the hold: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not held within {timeout_s} s")
        time.sleep(0.02)


def release(folder: Path) -> None:
    (folder / "release").touch()
