"""The training loop: learning, gradient accumulation, checkpoints, resume, stop, NaN guard."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.stopping import StopAt

from tinytale import train
from tinytale.checkpoint import LAST, load_checkpoint
from tinytale.config import load_config
from tinytale.inference import load_model
from tinytale.run import build_model, prepare_data
from tinytale.tracking import FanoutTracker, Tracker
from tinytale.train import StopRequest, fit

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=8", "train.warmup_steps=4", "train.device=cpu",
        "data.n_stories=80"]


def setup(overrides: list[str]):
    cfg = load_config(None, TINY + overrides)
    data = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size)
    return cfg, data, model


def fields(cfg, data):
    """What `tinytale train` adds to every checkpoint, less the run id (no tracking here)."""
    extra = {"config": cfg.to_dict(), "tokenizer": data.tokenizer.to_dict()}
    return lambda: extra


def as_on_a_gpu(monkeypatch, **choices: bool) -> None:
    """fit() with some of the choices it makes on CUDA (train.DeviceChoices), run on this CPU:
    its fused AdamW skips non-finite steps, a thread writes checkpoints. No GPU here."""
    cpu = train.device_choices(torch.device("cpu"))
    monkeypatch.setattr(train, "device_choices", lambda device: replace(cpu, **choices))


def run_fit(tmp: Path, overrides: list[str], tracker: Tracker | None = None,
            resume: dict | None = None, stop: StopRequest | None = None):
    cfg, data, model = setup(overrides)
    return fit(model, data, cfg.train, tracker or Tracker(), tmp, torch.device("cpu"),
               checkpoint_fields=fields(cfg, data), resume=resume, stop=stop), model


def test_lesson_loss_falls_from_guessing(tmp_path):
    result, _ = run_fit(tmp_path, ["train.epochs=4"])
    losses = [h["train_loss"] for h in result.state.history]
    assert result.status == "FINISHED"
    assert abs(result.state.first_step_loss - math.log(24)) < 0.15  # guessing at first
    assert losses[0] < math.log(24) + 0.1
    assert losses[-1] < losses[0] - 0.5
    assert all(h["val_perplexity"] == pytest.approx(math.exp(h["val_loss"]))
               for h in result.state.history)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """Batch 8 in one step equals two micro-batches of 4: same windows, summed gradients.

    Without biases: a key bias gets an exactly-zero gradient in theory, and Adam would blow
    its float noise up to full-size steps, hiding the comparison.
    """
    common = ["train.epochs=1", "model.bias=false"]
    big, big_model = run_fit(tmp_path / "a", [*common, "train.batch_size=8"])
    acc, acc_model = run_fit(tmp_path / "b", [*common, "train.batch_size=4",
                                              "train.grad_accum_steps=2"])
    assert big.state.step == acc.state.step > 0
    for (name, p), q in zip(big_model.state_dict().items(), acc_model.state_dict().values(),
                            strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    assert big.state.history[0]["train_loss"] == pytest.approx(
        acc.state.history[0]["train_loss"], rel=1e-5)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    result, model = run_fit(tmp_path, ["train.epochs=2"])
    reloaded, tokenizer, state = load_model(tmp_path / "last.pt")
    idx = torch.tensor([[tokenizer.eos_id, *tokenizer.encode("once upon a time")]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reloaded(idx)[0])
    assert state["train_state"]["epoch"] == 3 and state["finished"]


def test_checkpoint_fields_are_read_at_each_write(tmp_path):
    """A run id known only late (after a tracking outage) is in the checkpoints after that."""
    cfg, data, model = setup(["train.epochs=2"])
    run = {"id": None}

    class LearnsRunId(Tracker):
        def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
            if epoch == 2:
                run["id"] = "late"

    fixed = fields(cfg, data)()
    fit(model, data, cfg.train, LearnsRunId(), tmp_path, torch.device("cpu"),
        checkpoint_fields=lambda: {**fixed, "run_id": run["id"]})
    before, after = load_checkpoint(tmp_path / "last.prev.pt"), load_checkpoint(tmp_path / LAST)
    assert (before["train_state"]["epoch"], before["run_id"]) == (2, None)
    assert (after["train_state"]["epoch"], after["run_id"]) == (3, "late")
    assert after["config"] == cfg.to_dict()


def cut_at_epoch_2_batch_5_and_resume(folder: Path, overrides: list[str]):
    """Stop a run at micro-batch 5 of epoch 2 (as SIGTERM would), then resume it from last.pt."""
    stop = StopRequest()
    first, _ = run_fit(folder, overrides, tracker=StopAt(stop, 2, 5), stop=stop)
    assert first.status == "KILLED"
    saved = load_checkpoint(folder / LAST)
    assert saved["train_state"]["epoch"] == 2 and saved["train_state"]["batch"] == 5
    resumed, _ = run_fit(folder, overrides, resume=saved)
    assert resumed.status == "FINISHED"
    return resumed


@pytest.mark.parametrize("background", [False, True], ids=["cpu-writes", "gpu-style-writer"])
def test_stop_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch, background):
    """Also with checkpoints written by the background thread, as on a GPU."""
    overrides = ["train.epochs=3", "model.dropout=0.2"]
    straight, _ = run_fit(tmp_path / "straight", overrides)

    as_on_a_gpu(monkeypatch, background_checkpoints=background)
    resumed = cut_at_epoch_2_batch_5_and_resume(tmp_path / "cut", overrides)
    assert load_checkpoint(resumed.last_checkpoint)["finished"]  # on disk when fit() returned
    assert [h["epoch"] for h in resumed.state.history] == [1, 2, 3]
    for a, b in zip(straight.state.history, resumed.state.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_early_stopping_with_patience(tmp_path):
    result, _ = run_fit(tmp_path, ["train.epochs=40", "train.patience=2", "data.n_stories=40",
                                   "model.n_embd=64", "train.lr=1e-2"])
    assert result.early_stopped
    assert result.state.epochs_since_best == 2
    assert len(result.state.history) == result.state.best_epoch + 2


class PoisonWeights(Tracker):
    """Writes NaN into a weight mid-epoch, as a diverging run would."""

    def __init__(self, model_ref: list):
        self.model_ref = model_ref

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if epoch == 2 and batch == 1:
            with torch.no_grad():
                self.model_ref[0].wte.weight[0, 0] = float("nan")


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "on-device-skip"])
def test_non_finite_loss_fails_without_writing_bad_weights(tmp_path, monkeypatch, sync_free):
    """Both guards: the per-step host check (CPU default) and the sync-free fused-AdamW
    skip that CUDA uses (exercised here on the CPU's fused AdamW)."""
    as_on_a_gpu(monkeypatch, guard_on_device=sync_free)
    cfg, data, model = setup(["train.epochs=3"])
    ref = [model]
    result = fit(model, data, cfg.train, PoisonWeights(ref), tmp_path, torch.device("cpu"),
                 checkpoint_fields=fields(cfg, data))
    assert result.status == "FAILED" and "non-finite" in result.reason
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / name)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
        assert state["train_state"]["epoch"] == 2  # written after epoch 1, never after


class PoisonOnce(Tracker):
    """Makes one step's gradients NaN (a bad batch), leaving the weights intact."""

    def __init__(self, model_ref: list):
        self.model_ref, self.done = model_ref, False

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if epoch == 1 and batch == 3 and not self.done:
            self.done = True
            self.model_ref[0].wte.weight.grad.fill_(float("nan"))


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "on-device-skip"])
def test_non_finite_step_can_be_skipped(tmp_path, monkeypatch, sync_free):
    as_on_a_gpu(monkeypatch, guard_on_device=sync_free)
    cfg, data, model = setup(["train.epochs=2", "train.nonfinite=skip"])
    result = fit(model, data, cfg.train, PoisonOnce([model]), tmp_path, torch.device("cpu"),
                 checkpoint_fields=fields(cfg, data))
    assert result.status == "FINISHED"
    assert result.state.skipped_steps == 1
    assert all(math.isfinite(h["train_loss"]) for h in result.state.history)


class PoisonAfterBackward(Tracker):
    """Makes a weight inf after the backward pass of a given micro-batch, as an overflowing
    update would: that step's gradients are finite, the optimizer keeps the weight inf, and
    nothing runs forward again before the checkpoint that follows."""

    def __init__(self, model: torch.nn.Module, epoch: int, batch: int | None = None):
        self.model, self.epoch, self.batch = model, epoch, batch

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if epoch == self.epoch and batch == (self.batch or n_batches):
            with torch.no_grad():
                self.model.wte.weight[0, 0] = float("inf")


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "on-device-skip"])
@pytest.mark.parametrize("when", ["epoch-end", "every-steps", "stop"])
def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch, sync_free, when):
    as_on_a_gpu(monkeypatch, guard_on_device=sync_free)
    cfg, data, model = setup(["train.epochs=3", "train.checkpoint_every_steps=4"
                              if when == "every-steps" else "train.checkpoint_every_steps=0"])
    steps_per_epoch = len(data.train) // cfg.train.batch_size
    # The micro-batch whose step is followed by a checkpoint (accumulation is off).
    batch = {"epoch-end": None, "every-steps": 4 - steps_per_epoch % 4, "stop": 5}[when]
    stop = StopRequest()
    tracker = PoisonAfterBackward(model, epoch=2, batch=batch)
    if when == "stop":
        tracker = FanoutTracker([tracker, StopAt(stop, 2, batch)])
    result = fit(model, data, cfg.train, tracker, tmp_path, torch.device("cpu"),
                 checkpoint_fields=fields(cfg, data), stop=stop)
    step = steps_per_epoch + (batch or steps_per_epoch)
    assert result.status == "FAILED"
    assert result.reason.startswith(f"non-finite weights after step {step} (epoch 2)")
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / name)
        assert all(torch.isfinite(t).all() for t in saved["model"].values()), name
        if when != "every-steps":
            assert saved["train_state"]["epoch"] == 2  # written after epoch 1, never after
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] < step


class PoisonSteps(Tracker):
    """Makes the gradients of the given micro-batches of epoch 1 NaN (bad batches)."""

    def __init__(self, model: torch.nn.Module, batches: set[int]):
        self.model, self.batches = model, batches

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if epoch == 1 and batch in self.batches:
            self.model.wte.weight.grad.fill_(float("nan"))


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "on-device-skip"])
def test_skipping_more_than_max_skipped_steps_fails(tmp_path, monkeypatch, sync_free):
    as_on_a_gpu(monkeypatch, guard_on_device=sync_free)
    cfg, data, model = setup(["train.epochs=2", "train.nonfinite=skip",
                              "train.max_skipped_steps=1"])
    result = fit(model, data, cfg.train, PoisonSteps(model, {3, 5}), tmp_path,
                 torch.device("cpu"))
    assert result.status == "FAILED" and "non-finite" in result.reason
    assert result.state.skipped_steps == 2
    assert result.last_checkpoint is None  # nothing of the failing epoch was written


def test_random_window_offsets_change_training_and_resume_bit_for_bit(tmp_path):
    overrides = ["train.epochs=3", "data.stride=8", "data.window_offset=random"]
    fixed, _ = run_fit(tmp_path / "fixed", ["train.epochs=3", "data.stride=8"])
    straight, _ = run_fit(tmp_path / "straight", overrides)
    assert [h["train_loss"] for h in fixed.state.history] != \
        [h["train_loss"] for h in straight.state.history]

    resumed = cut_at_epoch_2_batch_5_and_resume(tmp_path / "cut", overrides)
    for a, b in zip(straight.state.history, resumed.state.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
