"""A tracker that asks the training loop to stop at a chosen micro-batch (as SIGTERM would)."""

from __future__ import annotations

from tinytale.loop.policy import StopRequest
from tinytale.tracking import Tracker


class StopAt(Tracker):
    """Asks the loop to stop once it reaches a given micro-batch of a given epoch."""

    def __init__(self, stop: StopRequest, epoch: int, batch: int):
        self.stop, self.epoch, self.batch = stop, epoch, batch

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if (epoch, batch) == (self.epoch, self.batch):
            self.stop.request("SIGTERM")
