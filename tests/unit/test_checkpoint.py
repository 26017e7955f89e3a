"""The background checkpoint writer: snapshots, order, errors (real files, a real thread)."""

from __future__ import annotations

import threading

import pytest
import torch

import tinytale.checkpoint as checkpoint_mod
from tinytale.checkpoint import CheckpointWriter, load_checkpoint


def test_submit_snapshots_the_state_before_training_moves_on(tmp_path, monkeypatch):
    # Hold the writer thread until the weights have changed, so the test does not depend on
    # which thread runs first.
    release = threading.Event()
    real_save = checkpoint_mod.save_checkpoint

    def gated_save(*args, **kwargs):
        assert release.wait(30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", gated_save)
    weights = torch.zeros(1000)
    writer = CheckpointWriter()
    writer.submit({"model": {"w": weights}, "history": [{"epoch": 1}]}, tmp_path / "last.pt")
    weights.add_(1.0)  # the next optimizer step, while the write is still pending
    release.set()
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.zeros(1000))


def test_writes_land_in_submission_order_with_previous_kept(tmp_path):
    writer = CheckpointWriter(depth=1)
    for epoch in range(1, 6):
        writer.submit({"model": {"w": torch.full((10,), float(epoch))}, "epoch": epoch},
                      tmp_path / "last.pt", keep_previous=True)
    writer.close()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 5
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


@pytest.mark.parametrize("report", ["wait", "close"])
def test_a_failed_write_is_raised_to_the_training_thread(tmp_path, report):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    writer = CheckpointWriter()
    writer.submit({"model": {}}, blocker / "last.pt")
    with pytest.raises(OSError):
        getattr(writer, report)()
    if report == "wait":
        # The writer goes on working for later checkpoints once the error was reported.
        writer.submit({"model": {}, "epoch": 2}, tmp_path / "last.pt")
        writer.close()
        assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_foreground_writer_has_written_when_submit_returns(tmp_path):
    writer = CheckpointWriter(background=False)
    writer.submit({"model": {"w": torch.ones(3)}}, tmp_path / "best.pt")
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(3))
    writer.close()


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_a_copy_gets_the_same_bytes_and_each_file_is_replaced_whole(tmp_path, background):
    """best.pt on an improving epoch: last.pt's bytes, written without serialising twice;
    an older best.pt is replaced, and a later last.pt leaves the copy alone."""
    (tmp_path / "best.pt").write_bytes(b"an older best")
    writer = CheckpointWriter(background=background)
    writer.submit({"model": {"w": torch.arange(5.0)}, "epoch": 3}, tmp_path / "last.pt",
                  keep_previous=True, copies=[tmp_path / "best.pt"])
    writer.submit({"model": {"w": torch.zeros(5)}, "epoch": 4}, tmp_path / "last.pt",
                  keep_previous=True)
    writer.close()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 3 and torch.equal(best["model"]["w"], torch.arange(5.0))
    assert (tmp_path / "best.pt").read_bytes() == (tmp_path / "last.prev.pt").read_bytes()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]


def test_the_model_file_is_the_checkpoint_without_its_training_state(tmp_path):
    """model.pt, what a run publishes: every field of best.pt but the AdamW moments and RNG
    states; the same weights; best.pt untouched."""
    from tinytale.checkpoint import capture_rng, save_checkpoint, save_model_copy

    full = {"model": {"w": torch.arange(4.0)}, "optimizer": {"state": {0: torch.ones(4)}},
            "rng": capture_rng(), "config": {"a": 1}, "tokenizer": {"kind": "char"}}
    save_checkpoint(full, tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()
    returned = save_model_copy(tmp_path / "best.pt", tmp_path / "model.pt")
    copy = load_checkpoint(tmp_path / "model.pt")
    assert set(copy) == set(returned) == {"format", "model", "config", "tokenizer"}
    assert torch.equal(copy["model"]["w"], torch.arange(4.0))
    assert (tmp_path / "best.pt").read_bytes() == before
    assert (tmp_path / "model.pt").stat().st_size < len(before)


class _NotData:
    """Any class: unpickling it needs code, which weights_only refuses."""


def test_foreign_pickle_is_refused_without_suggesting_the_unsafe_load(tmp_path):
    from tinytale.errors import UserError

    path = tmp_path / "foreign.pt"
    torch.save({"format": 1, "model": _NotData()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "pickled objects" in message
    assert "weights_only" not in message and "False" not in message
