"""fit(): the epoch training loop. Reports to a Tracker; knows nothing of MLflow, YAML or the CLI.

Each epoch runs optimizer steps (tinytale/loop/step.py: `grad_accum_steps` micro-batches
each), then validates, reports metrics and checkpoints. A non-finite gradient is skipped
or fails the run (loop/guard.py); `last.pt` and `best.pt` are written atomically, and early
stopping and stop requests (signals) are honoured at optimizer-step boundaries
(loop/policy.py), so a resumed run continues bit-for-bit (loop/epoch.py keeps the
partial-epoch sums). Weights that have become NaN or inf are never written: the run fails.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from tinytale.checkpoint import CheckpointWriter, restore_rng
from tinytale.config import TrainConfig
from tinytale.data import DataBundle, eval_loader, optimizer_steps_per_epoch, train_loader
from tinytale.device import autocast_for, choose_precision, peak_flops
from tinytale.distributed import Dist
from tinytale.inference import EpochSampler
from tinytale.loop.epoch import EpochAccumulator
from tinytale.loop.guard import NonFiniteGuard, make_guard
from tinytale.loop.policy import STOP_AGREE_EVERY_STEPS, CheckpointPolicy, StopRequest
from tinytale.loop.state import Ending, TrainingFailed, TrainState
from tinytale.loop.step import StepStats, TrainStep
from tinytale.metrics import perplexity
from tinytale.model import GPT, param_groups
from tinytale.optim import make_adamw
from tinytale.tracking import Tracker

# Re-exported: callers (run.py, the CLI's signal handlers, tests) import them from here.
__all__ = ["STOP_AGREE_EVERY_STEPS", "DeviceChoices", "FitResult", "StopRequest", "TrainState",
           "device_choices", "diverged", "evaluate", "fit", "make_optimizer", "seed_everything"]


# Below this width a CPU matrix product is too small to split across threads, and with two
# threads on a busy machine torch's barrier made the lesson 11 s -> 95 s (measured): one thread.
ONE_THREAD_BELOW_WIDTH = 128


@dataclass
class FitResult:
    status: str  # FINISHED | KILLED | FAILED
    state: TrainState
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    reason: str = ""
    early_stopped: bool = False

    def summary(self) -> dict[str, Any]:
        history = self.state.history
        tps = [h["tokens_per_sec"] for h in history]
        return {
            "status": self.status,
            "epochs": len(history),
            "best_epoch": self.state.best_epoch or None,
            "best_val_loss": _finite_or_none(self.state.best_val_loss),
            "first_step_loss": self.state.first_step_loss,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "final_val_loss": history[-1]["val_loss"] if history else None,
            "tokens_per_sec": float(np.median(tps)) if tps else None,
            "train_time_s": round(self.state.train_time_s, 3),
            "early_stopped": self.early_stopped,
            "checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "reason": self.reason or None,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class DeviceChoices:
    """What fit() does differently on an accelerator. Tests replace `device_choices` to run
    the GPU choices on a CPU (its fused AdamW, a writer thread)."""

    guard_on_device: bool  # non-finite steps skipped by the fused AdamW: no per-step host sync
    background_checkpoints: bool  # written by a thread while the device computes


def device_choices(device: torch.device) -> DeviceChoices:
    # On CUDA a per-step .item() stalls the GPU queue; a checkpoint thread only pays off
    # where the host CPU is otherwise idle, waiting on an accelerator.
    return DeviceChoices(guard_on_device=device.type == "cuda",
                         background_checkpoints=device.type != "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compiles(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the training forward pass runs under torch.compile (CUDA by default)."""
    return cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return make_adamw(param_groups(model, cfg.weight_decay), compiles(cfg, device),
                      lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int,
             device: torch.device, precision: str = "fp32") -> float:
    """Mean next-token cross-entropy over every validation window."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for x, y in eval_loader(data.val, batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device, precision):
            _, loss = model(x, y)
        total += loss.double() * y.numel()
        count += y.numel()
    model.train(was_training)
    return float(total.item() / count)


def fit(
    model: GPT,
    data: DataBundle,
    cfg: TrainConfig,
    tracker: Tracker,
    run_dir: Path,
    device: torch.device,
    checkpoint_fields: Callable[[], dict[str, Any]] | None = None,
    resume: dict[str, Any] | None = None,
    stop: StopRequest | None = None,
    log_every_steps: int = 0,
    dist: Dist | None = None,
    sampler: EpochSampler | None = None,
) -> FitResult:
    """Train `model` on `data` for `cfg.epochs` epochs; see the module docstring.

    `checkpoint_fields` returns what the caller adds to every checkpoint (config, tokenizer,
    run id); it is called at each write, so a value known only late is in the later files.
    On an accelerator, checkpoints are written in the background; every one is on disk when
    fit() returns, and finishes writing even if it raises. `sampler` (rank 0 only) generates
    text at the epochs it is due, reported through `tracker.log_samples`; it leaves the
    training bit-for-bit unchanged.
    """
    stop = stop if stop is not None else StopRequest()
    d = dist or Dist()
    # Before anything trains: a setting that leaves an epoch without a step is a UserError.
    steps_per_epoch = optimizer_steps_per_epoch(len(data.train), data.train.block_size,
                                                cfg.batch_size, cfg.grad_accum_steps,
                                                d.world_size)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    elif device.type == "cpu" and model.cfg.n_embd < ONE_THREAD_BELOW_WIDTH:
        torch.set_num_threads(1)
    if resume is None:
        seed_everything(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    state = TrainState() if resume is None else restore(resume, model, optimizer, tracker)

    choices = device_choices(device)
    guard = make_guard(choices.guard_on_device, optimizer, cfg, tracker)
    params = [p for p in model.parameters() if p.requires_grad]
    precision = choose_precision(cfg.precision, device.type, model.cfg.n_embd)
    train_step = TrainStep(wrap_for_steps(model, cfg, device, d), params, optimizer, guard,
                           cfg, tracker, device, d.enabled, steps_per_epoch, precision)
    policy = CheckpointPolicy(cfg, run_dir, model, optimizer, checkpoint_fields or (lambda: {}),
                              CheckpointWriter(background=choices.background_checkpoints),
                              resumed=resume is not None, stop=stop, tracker=tracker, dist=d,
                              device=device)
    loop = Loop(model, data, cfg, device, d, tracker, train_step, guard, policy,
                log_every_steps, peak_flops(device, cfg.peak_tflops), precision,
                sampler if d.is_main else None)
    model.train()
    try:
        while state.epoch <= cfg.epochs:
            ending = train_epoch(loop, state)
            if ending is not None:
                return fit_result(policy, state, ending)
    except TrainingFailed as failure:
        return fit_result(policy, state, Ending("FAILED", failure.reason))
    return fit_result(policy, state, Ending("FINISHED"))


def restore(resume: dict[str, Any], model: GPT, optimizer: torch.optim.Optimizer,
            tracker: Tracker) -> TrainState:
    """Weights, AdamW moments, RNGs and the loop's place, from a checkpoint's state."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    state = TrainState(**resume["train_state"])
    restore_rng(resume["rng"])
    tracker.on_event("resumed", {"epoch": state.epoch, "batch": state.batch, "step": state.step})
    return state


def wrap_for_steps(model: GPT, cfg: TrainConfig, device: torch.device, d: Dist
                   ) -> torch.nn.Module:
    """What runs the training forward pass: `model`, compiled (on CUDA by default), in DDP."""
    step_model = torch.compile(model, mode=cfg.compile_mode) if compiles(cfg, device) else model
    if d.enabled:
        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    return step_model


def fit_result(policy: CheckpointPolicy, state: TrainState, ending: Ending) -> FitResult:
    best, last = policy.close()  # the result names files: they must exist
    return FitResult(ending.status, state, best, last, ending.reason, ending.early_stopped)


@dataclass
class Loop:
    """What fit() builds once and every epoch uses."""

    model: GPT  # the weights: validated and checkpointed (the step runs a wrapped one)
    data: DataBundle
    cfg: TrainConfig
    device: torch.device
    dist: Dist
    tracker: Tracker
    train_step: TrainStep
    guard: NonFiniteGuard
    policy: CheckpointPolicy
    log_every_steps: int
    peak_flops: float | None
    precision: str  # 'bf16' (autocast) or 'fp32', as choose_precision resolved train.precision
    sampler: EpochSampler | None = None


def train_epoch(loop: Loop, state: TrainState) -> Ending | None:
    """The epoch `state` stands in, from its next micro-batch on; an Ending if training stops."""
    cfg, d = loop.cfg, loop.dist
    sums = EpochAccumulator(state, loop.device)
    loop.data.train.set_epoch(state.epoch)  # its window offset, from (seed, epoch) alone
    batches = iter(train_loader(loop.data.train, cfg.batch_size, cfg.seed, state.epoch,
                                start=state.batch, pin_memory=loop.device.type == "cuda",
                                rank=d.rank, world=d.world_size))
    # Leftover micro-batches that cannot fill an optimizer step are not read.
    while state.batch < loop.train_step.micro_per_epoch:
        stats = loop.train_step(batches, state)
        if stats is None:
            continue  # skipped by the host guard: it counts nowhere and triggers nothing
        sums.add(stats, state.step)
        report_step(loop, state, stats)
        ending = loop.policy.after_step(state, sums)
        if ending is not None:
            return ending
    loop.guard.end_epoch(sums, state)
    return finish_epoch(loop, state, sums)


def report_step(loop: Loop, state: TrainState, stats: StepStats) -> None:
    accum = loop.cfg.grad_accum_steps
    if state.first_step_loss is None:  # one host sync, once per run
        state.first_step_loss = float(stats.loss) / accum
    if loop.log_every_steps and state.step % loop.log_every_steps == 0:
        loop.tracker.log_metrics({"train_loss_step": float(stats.loss) / accum,
                                  "lr_step": stats.lr}, state.step)


def finish_epoch(loop: Loop, state: TrainState, sums: EpochAccumulator) -> Ending | None:
    """Validate and report the epoch whose steps are done, then checkpoint it."""
    epoch = state.epoch
    metrics = epoch_metrics(loop, state, sums)
    state.history.append({"epoch": epoch, **metrics})
    state.train_time_s += metrics["epoch_time_s"]
    val_loss = metrics["val_loss"]
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch, state.epochs_since_best = val_loss, epoch, 0
    else:
        state.epochs_since_best += 1
    loop.tracker.log_metrics(metrics, epoch)
    if not math.isfinite(val_loss):
        loop.policy.ensure_finite_weights(state, epoch)  # the cause, when it is the weights
        # Finite weights can still overflow the logits: such a model can be neither the
        # best nor worth resuming, and a run without best.pt must not end FINISHED.
        reason = (f"non-finite validation loss at epoch {epoch} (step {state.step}); "
                  "lower train.lr or train.weight_decay, or resume from the last checkpoint")
        loop.tracker.on_event("nonfinite", {"epoch": epoch, "step": state.step,
                                            "reason": reason})
        raise TrainingFailed(reason)
    if loop.sampler is not None and loop.sampler.due(epoch):
        rows = [{"epoch": epoch, "val_loss": val_loss, **row} for row in loop.sampler(loop.model)]
        loop.tracker.log_samples(epoch, rows)
    # Advance to the next epoch before saving, so last.pt resumes at its start.
    state.epoch += 1
    state.batch = 0
    EpochAccumulator.clear(state)
    return loop.policy.after_epoch(state, epoch, improved)


def epoch_metrics(loop: Loop, state: TrainState, sums: EpochAccumulator) -> dict[str, float]:
    cfg, d = loop.cfg, loop.dist
    train_loss = sums.train_loss(d, cfg.grad_accum_steps)
    train_elapsed = sums.elapsed_s()
    val_loss = evaluate(loop.model, loop.data, cfg.eval_batch_size or 4 * cfg.batch_size,
                        loop.device, loop.precision)
    epoch_time = sums.elapsed_s()
    tokens = loop.train_step.micro_per_epoch * cfg.batch_size * loop.data.train.block_size * \
        d.world_size
    metrics = {
        "train_loss": train_loss,
        "train_perplexity": perplexity(train_loss),
        "val_loss": val_loss,
        "val_perplexity": perplexity(val_loss),
        "generalization_gap": val_loss - train_loss,
        "lr": loop.train_step.lr(state.step),
        "grad_norm": sums.mean_grad_norm(),
        "tokens_per_sec": tokens / max(train_elapsed, 1e-9),
        "epoch_time_s": epoch_time,
    }
    if loop.peak_flops:
        # Per device: tokens_per_sec counts every rank's tokens, peak is one device's.
        metrics["mfu"] = loop.model.flops_per_token() * metrics["tokens_per_sec"] / \
            (loop.peak_flops * d.world_size)
    return metrics


def diverged(final_train_loss: float | None, final_val_loss: float | None, vocab_size: int
             ) -> bool:
    """Whether a finished run ended far worse than guessing: its last epoch's train or
    validation loss above twice the uniform-guessing level ln(V) (perplexity above V²).

    A model at initialisation sits near ln(V), and an overfitting one climbs back towards it;
    only a run blown up by its learning rate lands at twice that or beyond.
    """
    limit = 2 * math.log(max(2, vocab_size))
    return any(loss is not None and not loss <= limit
               for loss in (final_train_loss, final_val_loss))
