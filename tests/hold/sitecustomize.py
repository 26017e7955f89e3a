"""Test-only: hold a `tinytale train` process at one micro-batch while a test acts on it.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one;
tests/support/holding.py puts this folder first on PYTHONPATH together with
TINYTALE_TEST_HOLD=EPOCH:BATCH and TINYTALE_TEST_HOLD_DIR, so every Python process started with
that environment (a sweep's points and torchrun's ranks included) is held. After micro-batch
BATCH of epoch EPOCH, before its optimizer step, the training loop writes `held-<pid>` into the
folder and waits (the tracker's threads keep sending) until tinytale's own SIGTERM/SIGINT
handler asks it to stop, or a file `release` appears there. A signal or an outage then lands at
the same step on any machine, however fast it trains. Without the variable this file does
nothing.
"""

from __future__ import annotations

import os

HOLD_LIMIT_S = 300  # a held process nobody signals or releases goes on by itself


def _install(at: str, folder: str) -> None:
    import time
    from pathlib import Path

    from tinytale.tracking import FanoutTracker

    epoch, batch = (int(n) for n in at.split(":"))
    held = Path(folder)
    on_progress = FanoutTracker.on_progress

    def holding_on_progress(self, e: int, b: int, n_batches: int) -> None:
        on_progress(self, e, b, n_batches)
        if (e, b) != (epoch, batch):
            return
        from tinytale.train import StopRequest  # imported: fit() is the caller

        asked: list[str] = []
        request = StopRequest.request

        def noting_request(stop: StopRequest, reason: str) -> None:
            request(stop, reason)
            asked.append(reason)

        StopRequest.request = noting_request  # before the marker: no signal goes unseen
        held.mkdir(parents=True, exist_ok=True)  # in a container: a folder of its own
        (held / f"held-{os.getpid()}").touch()
        deadline = time.monotonic() + HOLD_LIMIT_S
        try:
            while not asked and not (held / "release").exists() and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            StopRequest.request = request

    FanoutTracker.on_progress = holding_on_progress


if os.environ.get("TINYTALE_TEST_HOLD"):
    _install(os.environ["TINYTALE_TEST_HOLD"], os.environ["TINYTALE_TEST_HOLD_DIR"])
