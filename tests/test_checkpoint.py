"""The background checkpoint writer: snapshots, order, errors (real files, a real thread)."""

from __future__ import annotations

import pytest
import torch

from tinytale.checkpoint import CheckpointWriter, load_checkpoint


def test_submit_snapshots_the_state_before_training_moves_on(tmp_path):
    weights = torch.zeros(1000)
    writer = CheckpointWriter()
    writer.submit({"model": {"w": weights}, "history": [{"epoch": 1}]}, tmp_path / "last.pt")
    weights.add_(1.0)  # the next optimizer step, while the write may still be running
    writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.zeros(1000))
    writer.close()


def test_writes_land_in_submission_order_with_previous_kept(tmp_path):
    writer = CheckpointWriter(depth=1)
    for epoch in range(1, 6):
        writer.submit({"model": {"w": torch.full((10,), float(epoch))}, "epoch": epoch},
                      tmp_path / "last.pt", keep_previous=True)
    writer.close()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 5
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_a_failed_write_is_raised_to_the_training_thread(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    writer = CheckpointWriter()
    writer.submit({"model": {}}, blocker / "last.pt")
    with pytest.raises(OSError):
        writer.wait()
    # The writer goes on working for later checkpoints once the error was reported.
    writer.submit({"model": {}, "epoch": 2}, tmp_path / "last.pt")
    writer.close()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_close_reports_an_error_not_yet_seen(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    writer = CheckpointWriter()
    writer.submit({"model": {}}, blocker / "best.pt")
    with pytest.raises(OSError):
        writer.close()


def test_foreground_writer_has_written_when_submit_returns(tmp_path):
    writer = CheckpointWriter(background=False)
    writer.submit({"model": {"w": torch.ones(3)}}, tmp_path / "best.pt")
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(3))
    writer.close()
