"""EpochAccumulator: an epoch's running sums, on the device, and their saved form in TrainState."""

from __future__ import annotations

import time

import torch

from tinytale.distributed import Dist
from tinytale.loop.state import TrainState
from tinytale.loop.step import StepStats


class EpochAccumulator:
    """Loss and grad-norm sums, step counts and skipped steps of the epoch in progress.

    The sums stay on the device, so adding a step costs no host sync; `save` reads them into
    TrainState (for a mid-epoch checkpoint), and a new accumulator starts from what was
    saved, so a resumed epoch reports the same means as an uninterrupted one.
    """

    def __init__(self, state: TrainState, device: torch.device):
        self.device = device
        self.started = time.perf_counter() - state.epoch_elapsed_s
        self.loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
        self.grad_norm_sum = torch.tensor(state.epoch_grad_norm_sum, device=device)
        self.steps = state.epoch_steps  # counts device-skipped steps until end_epoch reads them
        self.bad_steps = torch.tensor(state.epoch_bad_steps, device=device)
        self.first_bad = torch.tensor(state.first_bad_step, device=device)

    def add(self, stats: StepStats, step: int) -> None:
        if stats.skipped is None:  # the host guard: only applied steps get here
            self.loss_sum += stats.loss
            self.grad_norm_sum += stats.grad_norm
        else:  # the device guard: a skipped update adds nothing, with no host read to know it
            zero = torch.zeros((), device=self.device)
            self.loss_sum += torch.where(stats.skipped, zero, stats.loss)
            self.grad_norm_sum += torch.where(stats.skipped, zero, stats.grad_norm.float())
            self.bad_steps += stats.skipped
            self.first_bad = torch.where(stats.skipped & (self.first_bad == 0), step,
                                         self.first_bad)
        self.steps += 1

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def skipped_on_device(self) -> tuple[int, int]:
        """(steps the device skipped, the first of them): a host read, once per epoch."""
        return int(self.bad_steps), int(self.first_bad)

    def train_loss(self, dist: Dist, grad_accum_steps: int) -> float:
        """Mean loss per micro-batch over every rank; a collective and a host read."""
        return float(dist.mean(self.loss_sum)) / max(1, self.steps * grad_accum_steps)

    def mean_grad_norm(self) -> float:
        return float(self.grad_norm_sum) / max(1, self.steps)

    def save(self, state: TrainState) -> None:
        """Into `state`, for a checkpoint in the middle of the epoch (host reads)."""
        state.epoch_loss_sum = float(self.loss_sum)
        state.epoch_grad_norm_sum = float(self.grad_norm_sum)
        state.epoch_steps = self.steps
        state.epoch_bad_steps, state.first_bad_step = self.skipped_on_device()
        state.epoch_elapsed_s = self.elapsed_s()

    @staticmethod
    def clear(state: TrainState) -> None:
        """The saved form of an epoch not yet begun."""
        state.epoch_loss_sum = state.epoch_grad_norm_sum = state.epoch_elapsed_s = 0.0
        state.epoch_steps = state.epoch_bad_steps = state.first_bad_step = 0
