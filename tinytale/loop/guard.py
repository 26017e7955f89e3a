"""The non-finite guard: keeps NaN/inf gradients out of the weights, on the host or the device."""

from __future__ import annotations

from typing import Protocol

import torch

from tinytale.config import TrainConfig
from tinytale.loop.epoch import EpochAccumulator
from tinytale.loop.state import TrainingFailed, TrainState
from tinytale.tracking import Tracker


class NonFiniteGuard(Protocol):
    def allows(self, grad_norm: torch.Tensor, state: TrainState) -> bool:
        """Whether this step's update may run; False: skip it (its gradients are dropped)."""

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor
             ) -> torch.Tensor | None:
        """Run the update; return the device's flag of an update it skipped, if it keeps one."""

    def end_epoch(self, sums: EpochAccumulator, state: TrainState) -> None:
        """Account for the epoch's skipped steps; raises TrainingFailed past the limit."""


def make_guard(on_device: bool, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               tracker: Tracker) -> NonFiniteGuard:
    # Only the fused AdamW kernel can skip an update by itself (its found_inf).
    if on_device and optimizer.defaults.get("fused"):
        return DeviceGuard(cfg, tracker)
    return HostGuard(cfg, tracker)


class HostGuard:
    """One host sync a step (free on a CPU): a non-finite step never reaches the weights."""

    def __init__(self, cfg: TrainConfig, tracker: Tracker):
        self.cfg, self.tracker = cfg, tracker

    def allows(self, grad_norm: torch.Tensor, state: TrainState) -> bool:
        if torch.isfinite(grad_norm):
            return True
        state.skipped_steps += 1
        self.tracker.on_event("nonfinite", {
            "epoch": state.epoch, "step": state.step, "action": self.cfg.nonfinite,
            "reason": f"non-finite gradient norm ({float(grad_norm)})"})
        if too_many_skipped(self.cfg, state):
            raise nonfinite_failure(state.step, state.epoch)
        return False

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        optimizer.step()

    def end_epoch(self, sums: EpochAccumulator, state: TrainState) -> None:
        pass  # every bad step was dealt with when it happened


class DeviceGuard:
    """No per-step host sync (on CUDA it would stall the GPU queue): the fused AdamW kernel
    skips the whole update when found_inf is 1, and the host reads the count of skipped
    steps once, at the end of the epoch."""

    def __init__(self, cfg: TrainConfig, tracker: Tracker):
        self.cfg, self.tracker = cfg, tracker

    def allows(self, grad_norm: torch.Tensor, state: TrainState) -> bool:
        return True

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
        skipped = ~torch.isfinite(grad_norm)
        optimizer.found_inf = skipped.float()
        optimizer.step()
        return skipped

    def end_epoch(self, sums: EpochAccumulator, state: TrainState) -> None:
        n_bad, first_bad = sums.skipped_on_device()
        if not n_bad:
            return
        state.skipped_steps += n_bad
        sums.steps -= n_bad  # counted when added, before anyone knew they were skipped
        self.tracker.on_event("nonfinite", {
            "epoch": state.epoch, "step": first_bad, "action": self.cfg.nonfinite,
            "reason": f"non-finite gradient norm in {n_bad} step(s) of this epoch, "
                      f"first at step {first_bad}; those updates were skipped"})
        if too_many_skipped(self.cfg, state):
            raise nonfinite_failure(first_bad, state.epoch)


def too_many_skipped(cfg: TrainConfig, state: TrainState) -> bool:
    return cfg.nonfinite == "fail" or state.skipped_steps > cfg.max_skipped_steps


def nonfinite_failure(step: int, epoch: int) -> TrainingFailed:
    return TrainingFailed(f"non-finite loss or gradient at step {step} (epoch {epoch}); lower "
                          "train.lr or set train.nonfinite=skip")
