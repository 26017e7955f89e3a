"""Stories -> token windows -> batches. Knows nothing of models, training or tracking.

The split is by story (validation text never appears in training). Each split is one
token stream (stories joined by the end-of-story token) cut into windows of
`block_size + 1` tokens: inputs are the first `block_size`, targets the last `block_size`.
An epoch is one pass over the training windows in an order fixed by `(seed, epoch)`,
so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tinytale import distributed
from tinytale.errors import UserError
from tinytale.tokenizer import Tokenizer


class DataError(UserError):
    """The corpus cannot feed the configured model (too small, empty split, ...)."""


def split_stories(
    stories: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Deterministic split by story: the same stories, seed and fraction give the same split."""
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(stories) * val_fraction))
    if n_val >= len(stories):
        raise DataError(
            f"the corpus has {len(stories)} stories, too few to hold out {n_val} for validation "
            f"and still train; add stories or lower data.val_fraction (now {val_fraction})."
        )
    val = [stories[i] for i in sorted(order[:n_val])]
    train = [stories[i] for i in sorted(order[n_val:])]
    return train, val


def encode_stories(tokenizer: Tokenizer, stories: Sequence[str]) -> torch.Tensor:
    """One token stream: each story's ids followed by the end-of-story id."""
    if not stories:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(tokenizer.encode_many(stories))


class TokenWindows(Dataset):
    """Windows of `block_size + 1` tokens over one token stream, every `stride` tokens.

    The windows are a strided view (`unfold`), so a batch is one indexing op, not a Python
    loop over samples (`__getitems__` is what DataLoader calls for a whole batch).
    With `offset="random"`, `set_epoch(epoch)` shifts every window start by one offset in
    [0, stride) drawn from `(seed, epoch)` alone (so a resumed run and every rank agree): over
    the epochs the model sees the text cut at other places, as random windows do. The number
    of windows stays that of offset 0; a last window that would run past the end ends there.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int,
                 offset: str = "fixed", seed: int = 0):
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride
        self.offset_mode, self.seed = offset, seed
        self.offset = 0  # of the current epoch; 0 until set_epoch draws one
        if len(tokens) < block_size + 1:
            self.windows = tokens.new_empty((0, block_size + 1))
        else:
            self.windows = tokens.unfold(0, block_size + 1, stride)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s window offset (like DistributedSampler.set_epoch); fixed: always 0."""
        if self.offset_mode != "random" or self.stride == 1 or len(self) == 0:
            return
        # A string seed is hashed the same in every process (unlike hash()).
        self.offset = random.Random(f"window-offset:{self.seed}:{epoch}").randrange(self.stride)

    def starts(self, indices: torch.Tensor) -> torch.Tensor:
        """First token of each window in `indices` at the current offset."""
        last = len(self.tokens) - (self.block_size + 1)
        return (indices * self.stride + self.offset).clamp_(max=last)

    def _rows(self, indices: torch.Tensor) -> torch.Tensor:
        if self.offset == 0:
            return self.windows[indices]
        # Every window start, a view like self.windows: nothing is copied but the batch.
        return self.tokens.unfold(0, self.block_size + 1, 1)[self.starts(indices)]

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self._rows(torch.tensor([index]))[0].long()
        return window[:-1], window[1:]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # .long(): token files on disk are uint16/uint32; a no-op for in-memory streams.
        batch = self._rows(torch.as_tensor(indices, dtype=torch.long)).long()
        return batch[:, :-1], batch[:, 1:]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already returns stacked tensors


class EpochBatches(Sampler[list[int]]):
    """One rank's shuffled full batches of an epoch from batch `start`; order from (seed, epoch).

    With `world` ranks, global micro-batch g = b * world + rank goes to `rank` at its b-th
    micro-batch, so 2 ranks with batch 4 see exactly the windows 1 rank with batch 8 sees.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def per_rank(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        for b in range(self.start, self.per_rank()):
            g = b * self.world + self.rank
            yield order[g * self.batch_size : (g + 1) * self.batch_size].tolist()


def train_loader(
    windows: TokenWindows, batch_size: int, seed: int, epoch: int, start: int = 0,
    pin_memory: bool = False, rank: int = 0, world: int = 1,
) -> DataLoader:
    """The epoch's training batches (drop-last, so every micro-batch has the same size)."""
    sampler = EpochBatches(len(windows), batch_size, seed, epoch, start, rank, world)
    # A private generator: creating the iterator must not draw from torch's global RNG,
    # or a resumed run's dropout masks would drift from the uninterrupted run's.
    return DataLoader(windows, batch_sampler=sampler, collate_fn=_whole_batch,
                      pin_memory=pin_memory, generator=torch.Generator())


def eval_loader(windows: TokenWindows, batch_size: int) -> DataLoader:
    """All validation windows in order; the last batch may be smaller."""
    return DataLoader(windows, batch_size=batch_size, shuffle=False, collate_fn=_whole_batch,
                      generator=torch.Generator())


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TokenWindows
    val: TokenWindows
    n_train_stories: int
    n_val_stories: int

    def describe(self) -> dict[str, int]:
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "train_stories": self.n_train_stories,
            "val_stories": self.n_val_stories,
            "train_tokens": len(self.train.tokens),
            "val_tokens": len(self.val.tokens),
            "train_windows": len(self.train),
            "val_windows": len(self.val),
        }


def build_data(
    stories: Sequence[str],
    tokenizer: Tokenizer,
    block_size: int,
    val_fraction: float,
    seed: int,
    train_fraction: float = 1.0,
    stride: int | None = None,
    batch_size: int = 1,
    grad_accum_steps: int = 1,
    world_size: int | None = None,
    window_offset: str = "fixed",
    offset_seed: int = 0,
) -> DataBundle:
    train_stories, val_stories = split_stories(stories, val_fraction, seed)
    if train_fraction < 1.0:
        train_stories = train_stories[: max(1, math.ceil(len(train_stories) * train_fraction))]
    return windows_from_tokens(
        tokenizer, encode_stories(tokenizer, train_stories),
        encode_stories(tokenizer, val_stories), len(train_stories), len(val_stories),
        block_size, stride, batch_size, grad_accum_steps, world_size, window_offset,
        offset_seed,
    )


def optimizer_steps_per_epoch(n_windows: int, block_size: int, batch_size: int,
                              grad_accum_steps: int, world_size: int) -> int:
    """Optimizer steps in one epoch of `n_windows` windows; refuses a setting that makes none.

    Every process takes `batch_size` windows per micro-batch, so one step consumes
    `batch_size x grad_accum_steps x world_size` windows; leftovers are dropped.
    """
    needed = batch_size * grad_accum_steps * world_size
    if n_windows < needed:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        fewer = " or fewer processes" if world_size > 1 else ""
        raise DataError(
            f"the training split has {n_windows} windows of {block_size + 1} tokens, fewer "
            f"than one optimizer step needs (train.batch_size {batch_size} x "
            f"train.grad_accum_steps {grad_accum_steps}{processes} = {needed}), so an epoch "
            f"would train nothing; use a larger corpus, a smaller model.block_size, a smaller "
            f"batch{fewer}."
        )
    return n_windows // needed


def windows_from_tokens(
    tokenizer: Tokenizer, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
    n_train_stories: int, n_val_stories: int, block_size: int, stride: int | None,
    batch_size: int, grad_accum_steps: int, world_size: int | None = None,
    window_offset: str = "fixed", offset_seed: int = 0,
) -> DataBundle:
    """Cut both token streams into windows; refuse sizes that cannot train or validate.

    `world_size` is the number of training processes (None: torchrun's WORLD_SIZE, else 1).
    `window_offset` ("fixed" | "random") and `offset_seed` are the training windows'
    (TokenWindows); validation windows never move.
    """
    train = TokenWindows(train_tokens, block_size, stride or block_size, window_offset,
                         offset_seed)
    val = TokenWindows(val_tokens, block_size, block_size)
    if world_size is None:
        world_size = distributed.from_env().world_size
    optimizer_steps_per_epoch(len(train), block_size, batch_size, grad_accum_steps, world_size)
    if len(val) < 1:
        raise DataError(
            f"the validation split has {len(val.tokens)} tokens, fewer than one window of "
            f"{block_size + 1}; raise data.val_fraction or lower model.block_size."
        )
    return DataBundle(tokenizer, train, val, n_train_stories, n_val_stories)
