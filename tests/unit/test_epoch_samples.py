"""Per-epoch samples: when they are due, what the loop reports, and that generating them
leaves the training bit-for-bit as it would have been without them."""

from __future__ import annotations

import io

import torch
from test_train import fields, setup

from tinytale.inference import EpochSampler
from tinytale.tracking import ConsoleTracker, Tracker
from tinytale.train import fit


class SampleRecorder(Tracker):
    def __init__(self) -> None:
        self.rows: dict[int, list[dict]] = {}

    def log_samples(self, epoch: int, rows: list[dict]) -> None:
        self.rows[epoch] = rows


def train(tmp, sampler_every: int | None, tracker: Tracker | None = None):
    # Dropout on: a sampler that left the model in eval mode, or drew from the global RNG,
    # would change the next epoch's dropout masks and so every later weight.
    cfg, data, model = setup(["train.epochs=3", "model.dropout=0.2"])
    sampler = EpochSampler(data.tokenizer, sampler_every) if sampler_every else None
    result = fit(model, data, cfg.train, tracker or Tracker(), tmp, torch.device("cpu"),
                 checkpoint_fields=fields(cfg, data), sampler=sampler)
    return result, model, sampler


def test_sampling_leaves_training_bit_for_bit_unchanged(tmp_path):
    recorder = SampleRecorder()
    with_samples, sampled_model, sampler = train(tmp_path / "a", 1, recorder)
    without, plain_model, _ = train(tmp_path / "b", None)
    assert [h["train_loss"] for h in with_samples.state.history] == \
        [h["train_loss"] for h in without.state.history]
    assert [h["val_loss"] for h in with_samples.state.history] == \
        [h["val_loss"] for h in without.state.history]
    for (name, a), b in zip(sampled_model.state_dict().items(),
                            plain_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert sampled_model.training  # train mode restored
    assert sampler.seconds > 0

    # One row per epoch and prompt, with the epoch's validation loss.
    assert sorted(recorder.rows) == [1, 2, 3]
    for epoch, rows in recorder.rows.items():
        assert [r["sample"] for r in rows] == [0, 1]
        assert {r["epoch"] for r in rows} == {epoch}
        assert rows[0]["val_loss"] == with_samples.state.history[epoch - 1]["val_loss"]
        assert all(isinstance(r["text"], str) for r in rows)
    assert rows[0]["temperature"] == 0.0 and rows[1]["temperature"] == 1.0


def test_same_epoch_same_model_same_samples(tmp_path):
    """Fixed prompts and seeds: sampling a model twice gives the same rows."""
    cfg, data, model = setup([])
    sampler = EpochSampler(data.tokenizer, 1)
    assert sampler(model) == sampler(model)


def test_due_at_epoch_one_and_every_n():
    sampler = EpochSampler(tokenizer=None, every_epochs=5)  # type: ignore[arg-type]
    assert [e for e in range(1, 31) if sampler.due(e)] == [1, 5, 10, 15, 20, 25, 30]
    off = EpochSampler(tokenizer=None, every_epochs=0)  # type: ignore[arg-type]
    assert not any(off.due(e) for e in range(1, 31))


def test_console_shows_one_sample_line():
    out = io.StringIO()
    ConsoleTracker(out, progress=False).log_samples(
        5, [{"epoch": 5, "sample": 0, "text": "once upon a time " * 20},
            {"epoch": 5, "sample": 1, "text": "not shown"}])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample @ epoch 5: once upon a time")
    assert lines[0].endswith("...") and len(lines[0]) < 130


def test_the_example_prompt_is_the_lesson_opening_where_the_tokenizer_knows_it():
    """A published model's example request: "once upon a time" for the lesson's words and any
    character set holding its letters, the empty prompt for words it lacks."""
    from tinytale.inference import EXAMPLE_PROMPT, example_prompt
    from tinytale.tokenizer import CharTokenizer, WordTokenizer

    assert example_prompt(WordTokenizer.train(["once upon a time there was"])) == EXAMPLE_PROMPT
    assert example_prompt(CharTokenizer.train(["once upon a time"])) == EXAMPLE_PROMPT
    assert example_prompt(WordTokenizer.train(["the cat sat on the mat"])) == ""
    assert example_prompt(CharTokenizer.train(["xyz"])) == ""
