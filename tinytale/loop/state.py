"""TrainState: where training stands (all a resume needs); Ending, TrainingFailed: how it ends."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Where training stands: enough to continue exactly where it stopped."""

    epoch: int = 1  # epoch in progress, counted from 1
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done in the whole run
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    skipped_steps: int = 0
    first_step_loss: float | None = None  # the loss before any learning: ~ln(vocab) at random
    train_time_s: float = 0.0  # wall time of finished epochs, validation included
    # Partial-epoch accumulators, so a mid-epoch resume reports the same epoch means.
    epoch_loss_sum: float = 0.0
    epoch_grad_norm_sum: float = 0.0
    epoch_steps: int = 0
    epoch_elapsed_s: float = 0.0
    epoch_bad_steps: int = 0  # non-finite steps skipped on the device, not yet reported
    first_bad_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Ending:
    """Why the loop stops before (or at) its last epoch."""

    status: str  # FINISHED | KILLED | FAILED
    reason: str = ""
    early_stopped: bool = False


class TrainingFailed(Exception):
    """Raised where the loop finds it cannot go on (NaN, inf); fit() returns it as FAILED.

    Its one argument is the sentence for the user. Whoever raises it has already told the
    tracker (an `on_event`), and nothing of the failing state has been written."""

    @property
    def reason(self) -> str:
        return str(self.args[0])
