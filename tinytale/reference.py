"""Reference levels: the validation loss of three predictors that need no training.

A model has learned something beyond token frequencies once its validation loss falls below
the unigram level, and something beyond "which token follows which" once it falls below the
bigram level. All three are pure functions of token lists (counted on the training split,
scored on the validation split), in nats per token like the model's cross-entropy.

Smoothing, so that a token or pair the training split never shows costs a finite loss:

* uniform: every one of the V tokens equally likely, ln V.
* unigram: add-one (Laplace) counts, p(b) = (c(b) + 1) / (N + V).
* bigram: counts backed by the unigram with the weight of one observation (additive
  smoothing towards the unigram), p(b | a) = (c(a, b) + p_unigram(b)) / (c(a) + 1). An
  unseen context `a` then predicts exactly the unigram distribution.

The scored targets are the validation tokens after the first, the ones the bigram can
predict from a preceding token; both levels score the same targets. A corpus larger than
memory (streamed into token files) is counted on its first MAX_TOKENS training and scored on
its first MAX_TOKENS validation tokens: plenty for a level, and seconds rather than minutes
when a run starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Dense pair counts up to this many cells (V = 4096): 128 MiB of int64; beyond, sort pairs.
DENSE_PAIRS_MAX = 2**24

LEVEL_NAMES = ("uniform", "unigram", "bigram")
MAX_TOKENS = 20_000_000  # per split: 160 MB as int64


def _as_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy of guessing uniformly among `vocab_size` tokens: ln V."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    return math.log(vocab_size)


def unigram_probs(train: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed token frequencies of `train`, shape (V,)."""
    counts = np.bincount(_as_array(train), minlength=vocab_size).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + vocab_size)


def unigram_loss(train: Sequence[int] | np.ndarray, val: Sequence[int] | np.ndarray,
                 vocab_size: int) -> float:
    """Mean -ln p(b) over the validation targets val[1:], p from `unigram_probs(train)`."""
    targets = _as_array(val)[1:]
    if targets.size == 0:
        return math.nan
    probs = unigram_probs(train, vocab_size)
    return float(-np.log(probs[targets]).mean())


def bigram_loss(train: Sequence[int] | np.ndarray, val: Sequence[int] | np.ndarray,
                vocab_size: int) -> float:
    """Mean -ln p(val[i+1] | val[i]) with the smoothed bigram counted on `train`."""
    train_arr, val_arr = _as_array(train), _as_array(val)
    if val_arr.size < 2:
        return math.nan
    uni = unigram_probs(train_arr, vocab_size)
    context_counts = np.bincount(train_arr[:-1], minlength=vocab_size).astype(np.float64)
    train_codes = train_arr[:-1] * vocab_size + train_arr[1:]
    val_prev, val_next = val_arr[:-1], val_arr[1:]
    val_codes = val_prev * vocab_size + val_next
    if vocab_size * vocab_size <= DENSE_PAIRS_MAX:
        pair_counts = np.bincount(train_codes, minlength=vocab_size * vocab_size)[val_codes]
    else:  # a large vocabulary: count only the pairs that occur, then look the others up
        codes, counts = np.unique(train_codes, return_counts=True)
        pair_counts = np.zeros(val_codes.size, dtype=np.int64)
        if codes.size:
            where = np.searchsorted(codes, val_codes).clip(max=codes.size - 1)
            pair_counts = np.where(codes[where] == val_codes, counts[where], 0)
    probs = (pair_counts + uni[val_next]) / (context_counts[val_prev] + 1.0)
    return float(-np.log(probs).mean())


@dataclass(frozen=True)
class ReferenceLevels:
    """The three levels for one train/validation split, in nats per token."""

    uniform: float
    unigram: float
    bigram: float

    def params(self) -> dict[str, float]:
        """As logged once per run, with the config: `reference.uniform_loss`, ..."""
        return {param_name(name): getattr(self, name) for name in LEVEL_NAMES}


def param_name(level: str) -> str:
    return f"reference.{level}_loss"


def reference_levels(train: Sequence[int] | np.ndarray, val: Sequence[int] | np.ndarray,
                     vocab_size: int) -> ReferenceLevels:
    """All three levels; each split cut to its first MAX_TOKENS tokens."""
    train, val = train[:MAX_TOKENS], val[:MAX_TOKENS]
    return ReferenceLevels(uniform_loss(vocab_size), unigram_loss(train, val, vocab_size),
                           bigram_loss(train, val, vocab_size))


def first_epoch_below(history: Sequence[tuple[int, float]], level: float | None) -> int | None:
    """The first epoch whose value is below `level` (None: never, or no level)."""
    if level is None or not math.isfinite(level):
        return None
    for epoch, value in history:
        if math.isfinite(value) and value < level:
            return int(epoch)
    return None
