"""TrainStep: one optimizer step (its micro-batches, DDP no_sync accumulation, clipping, update)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tinytale.config import TrainConfig
from tinytale.device import autocast_for
from tinytale.loop.state import TrainState
from tinytale.schedule import lr_at
from tinytale.tracking import Tracker

if TYPE_CHECKING:
    from tinytale.loop.guard import NonFiniteGuard


@dataclass
class StepStats:
    """One applied optimizer step's numbers, left on the device: reading one is a host sync."""

    loss: torch.Tensor  # sum of the micro-batches' mean losses (grad_accum_steps times the mean)
    grad_norm: torch.Tensor  # before clipping
    lr: float
    skipped: torch.Tensor | None  # the device guard's flag: the optimizer skipped this update


class TrainStep:
    """Runs one optimizer step: `grad_accum_steps` micro-batches whose mean losses are each
    divided by `grad_accum_steps`, so the summed gradient is that of the whole batch's mean.

    `step_model` runs the forward pass (compiled, DDP-wrapped); `params` are the weights it
    updates, in the model's order.
    """

    def __init__(self, step_model: torch.nn.Module, params: list[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, cfg: TrainConfig,
                 tracker: Tracker, device: torch.device, ddp: bool, steps_per_epoch: int,
                 precision: str = "fp32"):
        self.step_model, self.params, self.optimizer = step_model, params, optimizer
        self.guard, self.cfg, self.tracker, self.device, self.ddp = guard, cfg, tracker, device, ddp
        self.micro_per_epoch = steps_per_epoch * cfg.grad_accum_steps
        self.total_steps = steps_per_epoch * cfg.epochs
        self.max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        self.precision = precision  # 'bf16': forward and loss under autocast

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, self.total_steps)

    def __call__(self, batches: Iterator, state: TrainState) -> StepStats | None:
        """The next step from `batches`; None when the host guard skipped it."""
        step_loss = self.forward_backward(batches, state)
        state.step += 1
        lr = self.lr(state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if not self.guard.allows(grad_norm, state):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        skipped = self.guard.step(self.optimizer, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(step_loss, grad_norm.detach(), lr, skipped)

    def forward_backward(self, batches: Iterator, state: TrainState) -> torch.Tensor:
        """Gradients of the step's micro-batches; returns the sum of their mean losses."""
        accum = self.cfg.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        for _ in range(accum):
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-batch of a step.
            last_micro = (state.batch + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not self.ddp else \
                self.step_model.no_sync()
            with sync:
                with autocast_for(self.device, self.precision):
                    _, loss = self.step_model(x, y)
                (loss / accum).backward()
            step_loss += loss.detach()
            state.batch += 1
            self.tracker.on_progress(state.epoch, state.batch, self.micro_per_epoch)
        return step_loss
