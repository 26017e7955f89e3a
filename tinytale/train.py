"""fit(): the epoch training loop. Reports to a Tracker; knows nothing of MLflow, YAML or the CLI.

One optimizer step = `grad_accum_steps` micro-batches whose mean losses are each divided
by `grad_accum_steps`, so the summed gradient equals the gradient of the mean loss over
the whole large batch. Per epoch it validates, reports metrics, writes `last.pt` (and
`best.pt` on a new best validation loss) atomically, and honours early stopping and stop
requests (signals) at optimizer-step boundaries, so a resumed run continues bit-for-bit.
Weights that have become NaN or inf are never written: the run fails instead.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from tinytale.checkpoint import BEST, LAST, CheckpointWriter, capture_rng, restore_rng
from tinytale.config import TrainConfig
from tinytale.data import DataBundle, eval_loader, optimizer_steps_per_epoch, train_loader
from tinytale.device import autocast_for, peak_flops
from tinytale.distributed import Dist
from tinytale.model import GPT, param_groups
from tinytale.schedule import lr_at
from tinytale.tracking import Tracker

# Under DDP the ranks agree on a stop request (one all-reduce and host read) only every this
# many optimizer steps, at checkpoint_every_steps boundaries and at epoch ends: a per-step
# agreement would be a per-step host sync on CUDA. A single process checks every step.
STOP_AGREE_EVERY_STEPS = 16


class StopRequest:
    """Set by a signal handler (or a test); the loop honours it at an optimizer-step boundary:
    the next one in a single process, within STOP_AGREE_EVERY_STEPS steps under DDP."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:
        # One fused kernel for the whole update where the device supports it.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int,
             device: torch.device) -> float:
    """Mean next-token cross-entropy over every validation window."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for x, y in eval_loader(data.val, batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device):
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
    checkpoint_extra: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    stop: StopRequest | None = None,
    log_every_steps: int = 0,
    dist: Dist | None = None,
    sync_free_guard: bool | None = None,
    background_checkpoints: bool | None = None,
) -> FitResult:
    """Train `model` on `data` for `cfg.epochs` epochs; see the module docstring.

    On an accelerator, checkpoints are written in the background; every one is on disk when
    fit() returns, and finishes writing even if it raises. `sync_free_guard` and
    `background_checkpoints` default to what the device calls for; tests set them to run the
    GPU choices on a CPU.
    """
    stop = stop if stop is not None else StopRequest()
    d = dist or Dist()
    accum = cfg.grad_accum_steps
    # Before anything trains: a setting that leaves an epoch without a step is a UserError.
    steps_per_epoch = optimizer_steps_per_epoch(len(data.train), data.train.block_size,
                                                cfg.batch_size, accum, d.world_size)
    extra = checkpoint_extra or {}
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    if resume is None:
        seed_everything(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state = TrainState(**resume["train_state"])
        restore_rng(resume["rng"])
        tracker.on_event("resumed", {"epoch": state.epoch, "batch": state.batch,
                                     "step": state.step})

    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    step_model: torch.nn.Module = (
        torch.compile(model, mode=cfg.compile_mode) if use_compile else model)
    if d.enabled:
        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    micro_per_epoch = steps_per_epoch * accum
    total_steps = steps_per_epoch * cfg.epochs
    eval_bs = cfg.eval_batch_size or 4 * cfg.batch_size
    tokens_per_micro = cfg.batch_size * data.train.block_size * d.world_size
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, cfg.peak_tflops)
    params = [p for p in model.parameters() if p.requires_grad]
    # On CUDA a per-step .item() stalls the GPU queue; let the fused optimizer skip bad steps.
    if sync_free_guard is None:
        sync_free_guard = device.type == "cuda"
    guard_on_device = sync_free_guard and bool(optimizer.defaults.get("fused"))
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    best_path, last_path = run_dir / BEST, run_dir / LAST
    # In the background only where the host CPU is otherwise idle, waiting on an accelerator.
    if background_checkpoints is None:
        background_checkpoints = device.type != "cpu"
    writer = CheckpointWriter(background=background_checkpoints)
    best_exists = best_path.exists() and resume is not None

    def checkpoint(path: Path, finished: bool = False) -> Path:
        if not d.is_main:
            return path
        # The whole training state in both files, best.pt too: it can seed a new run or a
        # fine-tune from the best epoch. The registry gets a copy without the AdamW moments.
        state_dict = {**extra, "model": model.state_dict(), "train_state": asdict(state),
                      "finished": finished, "run_id": tracker.run_id,
                      "optimizer": optimizer.state_dict(), "rng": capture_rng()}
        return writer.submit(state_dict, path, keep_previous=path.name == LAST)

    def result(status: str, reason: str = "", early: bool = False) -> FitResult:
        writer.close()  # the result names files: they must exist
        return FitResult(status, state, best_path if best_exists else None,
                         last_path if last_path.exists() else None, reason, early)

    def weights_are_finite() -> bool:
        """One fused reduction and host read, before each checkpoint (not each step)."""
        with torch.no_grad():
            # max |w| per tensor (the inf-norm, as clip_grad_norm_ computes it): NaN and inf
            # propagate, and unlike a sum or a 2-norm, finite weights cannot overflow it.
            max_abs = torch._foreach_norm(list(model.parameters()), math.inf)
            finite = bool(torch.stack(max_abs).isfinite().all())
        return not d.any(not finite, device)

    def failed_on_weights(epoch: int) -> FitResult:
        reason = (f"non-finite weights after step {state.step} (epoch {epoch}), not written "
                  "to a checkpoint; lower train.lr or resume from the last checkpoint")
        tracker.on_event("nonfinite_weights", {"epoch": epoch, "step": state.step,
                                               "reason": reason})
        return result("FAILED", reason)

    model.train()
    while state.epoch <= cfg.epochs:
        epoch = state.epoch
        t_start = time.perf_counter() - state.epoch_elapsed_s
        loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
        grad_norm_sum = torch.tensor(state.epoch_grad_norm_sum, device=device)
        step_loss = torch.zeros((), device=device)
        bad_steps = torch.tensor(state.epoch_bad_steps, device=device)
        first_bad = torch.tensor(state.first_bad_step, device=device)
        loader = train_loader(data.train, cfg.batch_size, cfg.seed, epoch, start=state.batch,
                              pin_memory=device.type == "cuda", rank=d.rank, world=d.world_size)
        for x, y in loader:
            if state.batch >= micro_per_epoch:
                break  # leftover micro-batches that cannot fill an optimizer step
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-batch of a step.
            last_micro = (state.batch + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not d.enabled else \
                step_model.no_sync()
            with sync:
                with autocast_for(device):
                    _, loss = step_model(x, y)
                (loss / accum).backward()
            step_loss += loss.detach()
            state.batch += 1
            tracker.on_progress(epoch, state.batch, micro_per_epoch)
            if state.batch % accum:
                continue
            state.step += 1
            lr = lr_at(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if guard_on_device:
                # No host sync: the fused AdamW kernel skips the whole update when found_inf
                # is 1, and the host reads the count of skipped steps at the end of the epoch.
                bad = ~torch.isfinite(grad_norm)
                optimizer.found_inf = bad.float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                zero = torch.zeros((), device=device)
                loss_sum += torch.where(bad, zero, step_loss)
                grad_norm_sum += torch.where(bad, zero, grad_norm.detach().float())
                bad_steps += bad
                first_bad = torch.where(bad & (first_bad == 0), state.step, first_bad)
            # Otherwise one host sync per step (free on a CPU): never let NaN/inf reach weights.
            elif not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                step_loss.zero_()
                state.skipped_steps += 1
                tracker.on_event("nonfinite", {
                    "epoch": epoch, "step": state.step, "action": cfg.nonfinite,
                    "reason": f"non-finite gradient norm ({float(grad_norm)})"})
                if cfg.nonfinite == "fail" or state.skipped_steps > cfg.max_skipped_steps:
                    return result("FAILED", f"non-finite loss or gradient at step "
                                             f"{state.step} (epoch {epoch}); lower train.lr "
                                             "or set train.nonfinite=skip")
                continue
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss
                grad_norm_sum += grad_norm.detach()
            state.epoch_steps += 1
            if state.first_step_loss is None:  # one host sync, once per run
                state.first_step_loss = float(step_loss) / accum
            if log_every_steps and state.step % log_every_steps == 0:
                tracker.log_metrics({"train_loss_step": float(step_loss) / accum,
                                     "lr_step": lr}, state.step)
            step_loss.zero_()
            checkpoint_due = bool(cfg.checkpoint_every_steps) and \
                state.step % cfg.checkpoint_every_steps == 0
            if not d.enabled:
                stopping = bool(stop)
            else:  # a collective: every rank takes the same branch at the same step
                stopping = (checkpoint_due or state.step % STOP_AGREE_EVERY_STEPS == 0) \
                    and d.any(bool(stop), device)
            if stopping or checkpoint_due:
                state.epoch_loss_sum = float(loss_sum)
                state.epoch_grad_norm_sum = float(grad_norm_sum)
                state.epoch_bad_steps, state.first_bad_step = int(bad_steps), int(first_bad)
                state.epoch_elapsed_s = time.perf_counter() - t_start
                if not weights_are_finite():
                    return failed_on_weights(epoch)
                checkpoint(last_path)
                if stopping:
                    return result("KILLED", f"stopped by {stop.reason or 'another rank'}")

        if guard_on_device and int(bad_steps):
            n_bad = int(bad_steps)
            state.skipped_steps += n_bad
            state.epoch_steps -= n_bad
            tracker.on_event("nonfinite", {
                "epoch": epoch, "step": int(first_bad), "action": cfg.nonfinite,
                "reason": f"non-finite gradient norm in {n_bad} step(s) of this epoch, "
                          f"first at step {int(first_bad)}; those updates were skipped"})
            if cfg.nonfinite == "fail" or state.skipped_steps > cfg.max_skipped_steps:
                return result("FAILED", f"non-finite loss or gradient at step {int(first_bad)} "
                                         f"(epoch {epoch}); lower train.lr or set "
                                         "train.nonfinite=skip")
        loss_sum = d.mean(loss_sum)
        train_loss = float(loss_sum) / max(1, state.epoch_steps * accum)
        train_elapsed = time.perf_counter() - t_start
        val_loss = evaluate(model, data, eval_bs, device)
        epoch_time = time.perf_counter() - t_start
        lr_now = lr_at(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)
        metrics = {
            "train_loss": train_loss,
            "train_perplexity": _safe_exp(train_loss),
            "val_loss": val_loss,
            "val_perplexity": _safe_exp(val_loss),
            "generalization_gap": val_loss - train_loss,
            "lr": lr_now,
            "grad_norm": float(grad_norm_sum) / max(1, state.epoch_steps),
            "tokens_per_sec": micro_per_epoch * tokens_per_micro / max(train_elapsed, 1e-9),
            "epoch_time_s": epoch_time,
        }
        if peak:
            # Per device: tokens_per_sec counts every rank's tokens, peak is one device's.
            metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / (peak * d.world_size)
        state.history.append({"epoch": epoch, **metrics})
        state.train_time_s += epoch_time
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.epochs_since_best = val_loss, epoch, 0
        else:
            state.epochs_since_best += 1
        tracker.log_metrics(metrics, epoch)
        if not math.isfinite(val_loss):
            if not weights_are_finite():  # the cause, when it is the weights themselves
                return failed_on_weights(epoch)
            # Finite weights can still overflow the logits: such a model can be neither the
            # best nor worth resuming, and a run without best.pt must not end FINISHED.
            reason = (f"non-finite validation loss at epoch {epoch} (step {state.step}); "
                      "lower train.lr or train.weight_decay, or resume from the last checkpoint")
            tracker.on_event("nonfinite", {"epoch": epoch, "step": state.step, "reason": reason})
            return result("FAILED", reason)

        # Advance to the next epoch before saving, so last.pt resumes at its start.
        state.epoch += 1
        state.batch = 0
        state.epoch_loss_sum = state.epoch_grad_norm_sum = state.epoch_elapsed_s = 0.0
        state.epoch_steps = state.epoch_bad_steps = state.first_bad_step = 0
        early = bool(cfg.patience) and state.epochs_since_best >= cfg.patience
        finished = early or state.epoch > cfg.epochs
        if not weights_are_finite():
            return failed_on_weights(epoch)
        checkpoint(last_path, finished=finished)
        if improved:
            checkpoint(best_path, finished=finished)
            best_exists = True
        if early:
            tracker.on_event("early_stop", {"epoch": epoch, "best_epoch": state.best_epoch,
                                            "patience": cfg.patience})
            return result("FINISHED", early=True)
        if d.any(bool(stop), device) if d.enabled else stop:
            return result("KILLED", f"stopped by {stop.reason or 'another rank'}")
    return result("FINISHED")


# exp(88.72) is float32's largest value: past it a perplexity, as torch computes it from a
# float32 loss, is inf. Larger finite numbers would only print as 40- to 300-digit figures.
PERPLEXITY_MAX_LOSS = 88.72


def _safe_exp(x: float) -> float:
    return math.exp(x) if x <= PERPLEXITY_MAX_LOSS else math.inf


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
