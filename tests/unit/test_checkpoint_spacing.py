"""Epoch-end checkpoints take at most CHECKPOINT_MAX_SHARE of the loop's time: which epoch ends
write, and that best.pt still holds the best epoch's weights when that epoch was not written.

The policy's clock is a fake one that moves only when the test says (12 s an epoch, 1 s a
write), so nothing here depends on how fast this machine is."""

from __future__ import annotations

import torch
from test_train import fields, setup

from tinytale.checkpoint import BEST, LAST, CheckpointWriter, load_checkpoint
from tinytale.config import load_config
from tinytale.distributed import Dist
from tinytale.loop import policy as policy_mod
from tinytale.loop.policy import CheckpointPolicy, StopRequest
from tinytale.loop.state import TrainState
from tinytale.tracking import Tracker
from tinytale.train import fit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowWriter(CheckpointWriter):
    """Writes in the caller's thread, each submit taking 1 s of the fake clock."""

    def __init__(self, clock: Clock):
        super().__init__(background=False)
        self.clock = clock

    def submit(self, *args, **kwargs):
        self.clock.now += 1.0
        return super().submit(*args, **kwargs)


def make_policy(tmp_path, epochs: int):
    clock = Clock()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = load_config(None, [f"train.epochs={epochs}"]).train
    policy = CheckpointPolicy(cfg, tmp_path, model, optimizer, lambda: {}, SlowWriter(clock),
                              resumed=False, stop=StopRequest(), tracker=Tracker(),
                              dist=Dist(), device=torch.device("cpu"), clock=clock)
    return policy, model, clock


def end_epoch(policy, model, clock, state: TrainState, epoch: int, improved: bool):
    """The weights of epoch `epoch` are all `epoch`; 12 s of training precede its end."""
    clock.now += 12.0
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(epoch))
    if improved:
        state.best_epoch = epoch
    state.epoch = epoch + 1
    return policy.after_epoch(state, epoch, improved)


def written(path) -> tuple[float, int]:
    """(the weights' epoch, the epoch the file resumes at)."""
    state = load_checkpoint(path)
    return float(state["model"]["weight"][0, 0]), state["train_state"]["epoch"]


def test_epoch_ends_write_only_as_often_as_the_share_allows(tmp_path):
    """A write of 1 s after 12 s epochs is 8%: after epoch 1's write (ending at 13 s), the
    next epoch end to write is the first 50 s later (epoch 6, at 73 s), and the last epoch
    always writes. Epoch 4, the best, was not written at its end: best.pt gets it, from
    memory, with epoch 6's write."""
    policy, model, clock = make_policy(tmp_path, epochs=8)
    state = TrainState()
    improved = {1: True, 2: True, 3: False, 4: True, 5: False, 6: False, 7: False, 8: False}
    seen = {}
    for epoch in range(1, 9):
        end_epoch(policy, model, clock, state, epoch, improved[epoch])
        seen[epoch] = written(tmp_path / BEST), written(tmp_path / LAST)
    assert seen[1] == ((1.0, 2), (1.0, 2))
    assert seen[5] == seen[1]  # epochs 2-5: nothing written
    assert seen[6] == ((4.0, 5), (6.0, 7))
    assert seen[7] == seen[6]
    assert seen[8] == ((4.0, 5), (8.0, 9))
    assert load_checkpoint(tmp_path / LAST)["finished"] is True
    best, last = policy.close()
    assert (best, last) == (tmp_path / BEST, tmp_path / LAST)
    assert written(tmp_path / BEST) == (4.0, 5)


def test_a_run_ending_between_writes_still_gets_its_best_epoch(tmp_path):
    """Training that fails (or is stopped mid-epoch) after a better epoch that was not
    written: close() writes it."""
    policy, model, clock = make_policy(tmp_path, epochs=8)
    state = TrainState()
    end_epoch(policy, model, clock, state, 1, True)
    end_epoch(policy, model, clock, state, 2, True)
    assert written(tmp_path / BEST) == (1.0, 2)
    best, _ = policy.close()
    assert best == tmp_path / BEST and written(best) == (2.0, 3)
    assert written(tmp_path / LAST) == (1.0, 2)  # last.pt is what was written: resumable


def test_a_stop_at_an_epoch_end_writes_whatever_the_spacing(tmp_path):
    policy, model, clock = make_policy(tmp_path, epochs=8)
    state = TrainState()
    end_epoch(policy, model, clock, state, 1, True)
    policy.stop.request("SIGTERM")
    ending = end_epoch(policy, model, clock, state, 2, False)
    assert ending is not None and ending.status == "KILLED"
    assert written(tmp_path / LAST) == (2.0, 3)


class WeightsAtEpochEnds(Tracker):
    """The model's weights when each epoch's metrics are logged, just before its checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def log_metrics(self, metrics, step):
        self.weights[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_fit_writes_the_best_epoch_even_when_only_the_first_and_last_ends_write(
        tmp_path, monkeypatch):
    """With a share so small that no epoch end between the first and the last may write,
    best.pt still holds exactly the weights of the epoch with the lowest validation loss."""
    monkeypatch.setattr(policy_mod, "CHECKPOINT_MAX_SHARE", 1e-12)
    cfg, data, model = setup(["train.epochs=6"])
    tracker = WeightsAtEpochEnds(model)
    result = fit(model, data, cfg.train, tracker, tmp_path, torch.device("cpu"),
                 checkpoint_fields=fields(cfg, data))
    assert result.status == "FINISHED"
    best = load_checkpoint(result.best_checkpoint)
    losses = [h["val_loss"] for h in result.state.history]
    best_epoch = losses.index(min(losses)) + 1
    assert best["train_state"]["best_epoch"] == best_epoch
    for key, tensor in tracker.weights[best_epoch].items():
        assert torch.equal(best["model"][key], tensor), key
    assert load_checkpoint(result.last_checkpoint)["finished"] is True
