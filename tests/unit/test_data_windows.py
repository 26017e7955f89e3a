"""Training windows with a per-epoch random offset (data.window_offset: random)."""

from __future__ import annotations

import pytest
import torch

from tinytale.config import ConfigError, load_config
from tinytale.data import TokenWindows, train_loader
from tinytale.run import prepare_data

BLOCK, STRIDE = 16, 8


def stream(n: int = 1003) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)  # token i is i: a window's first token is its start


def windows(offset: str = "random", seed: int = 0, n: int = 1003) -> TokenWindows:
    return TokenWindows(stream(n), BLOCK, STRIDE, offset, seed)


def first_tokens(w: TokenWindows, epoch: int) -> list[int]:
    w.set_epoch(epoch)
    x, _ = w.__getitems__(list(range(len(w))))
    return x[:, 0].tolist()


def test_offsets_differ_across_epochs_and_stay_below_the_stride():
    w = windows()
    offsets = []
    for epoch in range(1, 21):
        w.set_epoch(epoch)
        offsets.append(w.offset)
    assert all(0 <= o < STRIDE for o in offsets)
    assert len(set(offsets)) > 3  # 20 draws from 8 values


def test_same_seed_and_epoch_give_the_same_windows_another_seed_others():
    a, b = windows(seed=7), windows(seed=7)
    for epoch in (1, 2, 5):
        assert first_tokens(a, epoch) == first_tokens(b, epoch)
    other = windows(seed=8)
    assert any(first_tokens(a, e) != first_tokens(other, e) for e in range(1, 11))


@pytest.mark.parametrize("n", [1003, 17, 24, 25, 40])
def test_every_window_is_in_range_and_their_number_never_changes(n):
    w = windows(n=n)
    count = len(w)
    assert count == len(TokenWindows(stream(n), BLOCK, STRIDE))  # as many as fixed windows
    for epoch in range(1, 30):
        w.set_epoch(epoch)
        assert len(w) == count
        x, y = w.__getitems__(list(range(count)))
        starts = x[:, 0]
        assert int(starts.min()) >= 0 and int(y[:, -1].max()) <= n - 1
        # Contiguous windows whose targets are the inputs shifted by one.
        assert torch.equal(x, starts[:, None] + torch.arange(BLOCK))
        assert torch.equal(y, x + 1)
        single_x, single_y = w[count - 1]
        assert torch.equal(single_x, x[-1]) and torch.equal(single_y, y[-1])


def test_fixed_windows_never_move():
    fixed = windows(offset="fixed")
    expected = list(range(0, 1003 - BLOCK, STRIDE))
    for epoch in (1, 2, 3):
        assert first_tokens(fixed, epoch) == expected


def test_the_loader_serves_the_epoch_offset_and_its_own_order():
    w = windows(seed=3)
    w.set_epoch(2)
    (x, _), = list(train_loader(w, batch_size=len(w), seed=3, epoch=2))
    assert sorted(x[:, 0].tolist()) == sorted(first_tokens(w, 2))
    assert all((s - w.offset) % STRIDE == 0 or s == 1003 - BLOCK - 1 for s in x[:, 0].tolist())


def test_config_random_moves_training_windows_only():
    cfg = load_config(None, ["data.n_stories=80", "model.block_size=16", "data.stride=8",
                             "data.window_offset=random", "train.seed=5"])
    data = prepare_data(cfg)
    val_before = data.val.__getitems__(list(range(len(data.val))))
    assert data.train.offset_mode == "random" and data.train.seed == 5
    assert data.val.offset_mode == "fixed"
    moved = False
    for epoch in range(1, 6):
        data.train.set_epoch(epoch)
        moved = moved or data.train.offset != 0
    assert moved
    data.val.set_epoch(3)  # a no-op: validation windows never move
    val_after = data.val.__getitems__(list(range(len(data.val))))
    assert all(torch.equal(a, b) for a, b in zip(val_before, val_after, strict=True))


def test_config_default_is_fixed_and_other_values_are_refused():
    assert load_config(None, []).data.window_offset == "fixed"
    with pytest.raises(ConfigError, match="data.window_offset='sometimes' is not one of"):
        load_config(None, ["data.window_offset=sometimes"])
