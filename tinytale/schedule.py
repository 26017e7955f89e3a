"""Learning-rate schedule: linear warmup from 0, then cosine decay to `min_lr`. Pure function."""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (counted from 1 for the first update).

    - warmup: `max_lr * step / warmup_steps` for step <= warmup_steps (0 at step 0, peak at
      step == warmup_steps);
    - decay: cosine from `max_lr` at warmup_steps to `min_lr` at total_steps;
    - after total_steps: `min_lr`.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return max_lr * max(step, 0) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
