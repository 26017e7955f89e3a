"""CheckpointPolicy: when fit() writes last.pt and best.pt and when it stops (steps, epochs,
patience, stop requests agreed across DDP ranks), never with non-finite weights."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tinytale.checkpoint import BEST, LAST, CheckpointWriter, capture_rng, snapshot
from tinytale.config import TrainConfig
from tinytale.distributed import Dist
from tinytale.loop.epoch import EpochAccumulator
from tinytale.loop.state import Ending, TrainingFailed, TrainState
from tinytale.tracking import Tracker

# Under DDP the ranks agree on a stop request (one all-reduce and host read) only every this
# many optimizer steps, at checkpoint_every_steps boundaries and at epoch ends: a per-step
# agreement would be a per-step host sync on CUDA. A single process checks every step.
STOP_AGREE_EVERY_STEPS = 16
# Epoch-end checkpoints may take at most this share of the loop's time: after a write that
# blocked the loop for t seconds, the next epoch end writes only once t / share have passed
# (the lesson's 0.1 s epochs and ~9 ms writes: every ~5th epoch). The last epoch, a stop and
# checkpoint_every_steps always write; a better epoch between writes is kept in memory and
# written as best.pt with the next write. A crash loses at most that much training.
CHECKPOINT_MAX_SHARE = 0.02


class StopRequest:
    """Set by a signal handler (or a test); the loop honours it at an optimizer-step boundary:
    the next one in a single process, within STOP_AGREE_EVERY_STEPS steps under DDP."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


class CheckpointPolicy:
    """Writes `last.pt` every `checkpoint_every_steps` steps, at a stop, at the last epoch and
    at the epoch ends that CHECKPOINT_MAX_SHARE allows, `best.pt` (the epoch with the best
    validation loss) with them; ends training on patience or a stop request. Only rank 0
    writes; every rank takes the same decisions about training.

    `fields` returns what the caller adds to every checkpoint; it is called at each write.
    `clock` is what the write spacing is measured with.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, fields: Callable[[], dict[str, Any]],
                 writer: CheckpointWriter, resumed: bool, stop: StopRequest, tracker: Tracker,
                 dist: Dist, device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.model, self.optimizer, self.fields = cfg, model, optimizer, fields
        self.writer, self.stop, self.tracker, self.dist, self.device = \
            writer, stop, tracker, dist, device
        self.best_path, self.last_path = run_dir / BEST, run_dir / LAST
        self.best_written = resumed and self.best_path.exists()
        self.clock = clock
        self.next_write_at = -math.inf  # the first epoch end writes
        self.unwritten_best: dict[str, Any] | None = None  # a better epoch since the last write

    def after_step(self, state: TrainState, sums: EpochAccumulator) -> Ending | None:
        every = self.cfg.checkpoint_every_steps
        due = bool(every) and state.step % every == 0
        stopping = self._stop_agreed(due or state.step % STOP_AGREE_EVERY_STEPS == 0)
        if not (stopping or due):
            return None
        sums.save(state)  # so last.pt resumes this epoch with the same means
        self.ensure_finite_weights(state, state.epoch)
        self._write(self.last_path, state)
        return self._stopped() if stopping else None

    def after_epoch(self, state: TrainState, epoch: int, improved: bool) -> Ending | None:
        """`state` already stands at the next epoch's start, so last.pt resumes there."""
        early = bool(self.cfg.patience) and state.epochs_since_best >= self.cfg.patience
        finished = early or state.epoch > self.cfg.epochs
        self.ensure_finite_weights(state, epoch)
        stopping = self._stop_agreed(True)
        if finished or stopping or self.clock() >= self.next_write_at:
            if improved:
                self.unwritten_best = None  # this epoch's best.pt supersedes it
            self.write_unwritten_best()
            # best.pt, when the epoch improved, is the same state: the same bytes, copied.
            self._write(self.last_path, state, finished,
                        copies=[self.best_path] if improved else ())
            self.best_written = self.best_written or improved
        elif improved and self.dist.is_main:
            self.unwritten_best = snapshot(self._checkpoint(state, finished))
        if early:
            self.tracker.on_event("early_stop", {"epoch": epoch, "best_epoch": state.best_epoch,
                                                 "patience": self.cfg.patience})
            return Ending("FINISHED", early_stopped=True)
        return self._stopped() if stopping else None

    def write_unwritten_best(self) -> None:
        """best.pt from the better epoch kept in memory, if any."""
        best, self.unwritten_best = self.unwritten_best, None
        if best is not None:
            self._timed(lambda: self.writer.submit(best, self.best_path))
            self.best_written = True

    def close(self) -> tuple[Path | None, Path | None]:
        """(best.pt, last.pt) where they exist, once every write is on disk."""
        try:
            self.write_unwritten_best()  # a run that failed after its best epoch
        finally:
            self.writer.close()
        return (self.best_path if self.best_written else None,
                self.last_path if self.last_path.exists() else None)

    def ensure_finite_weights(self, state: TrainState, epoch: int) -> None:
        """Raises TrainingFailed if any weight is NaN or inf on any rank: a collective, so
        every rank calls it at the same points; one fused reduction and host read, before
        each checkpoint (not each step)."""
        with torch.no_grad():
            # max |w| per tensor (the inf-norm, as clip_grad_norm_ computes it): NaN and inf
            # propagate, and unlike a sum or a 2-norm, finite weights cannot overflow it.
            max_abs = torch._foreach_norm(list(self.model.parameters()), math.inf)
            finite = bool(torch.stack(max_abs).isfinite().all())
        if not self.dist.any(not finite, self.device):
            return
        reason = (f"non-finite weights after step {state.step} (epoch {epoch}), not written "
                  "to a checkpoint; lower train.lr or resume from the last checkpoint")
        self.tracker.on_event("nonfinite_weights", {"epoch": epoch, "step": state.step,
                                                    "reason": reason})
        raise TrainingFailed(reason)

    def _write(self, path: Path, state: TrainState, finished: bool = False,
               copies: Sequence[Path] = ()) -> None:
        if not self.dist.is_main:
            return
        checkpoint = self._checkpoint(state, finished)
        self._timed(lambda: self.writer.submit(checkpoint, path, keep_previous=path.name == LAST,
                                               copies=copies))

    def _checkpoint(self, state: TrainState, finished: bool) -> dict[str, Any]:
        # The whole training state in both files, best.pt too: it can seed a new run or a
        # fine-tune from the best epoch. The registry gets a copy without the AdamW moments.
        return {**self.fields(), "model": self.model.state_dict(),
                "train_state": asdict(state), "finished": finished,
                "optimizer": self.optimizer.state_dict(), "rng": capture_rng()}

    def _timed(self, write: Callable[[], object]) -> None:
        """Run `write`; the next epoch-end write waits for CHECKPOINT_MAX_SHARE of its time."""
        start = self.clock()
        write()
        end = self.clock()
        self.next_write_at = end + (end - start) / CHECKPOINT_MAX_SHARE

    def _stop_agreed(self, may_agree: bool) -> bool:
        if not self.dist.enabled:
            return bool(self.stop)
        # A collective: every rank takes the same branch at the same step.
        return may_agree and self.dist.any(bool(self.stop), self.device)

    def _stopped(self) -> Ending:
        return Ending("KILLED", f"stopped by {self.stop.reason or 'another rank'}")
