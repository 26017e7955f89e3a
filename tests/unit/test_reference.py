"""Reference levels on hand-made token lists, worked out by hand in the comments."""

import math

import numpy as np
import pytest

from tinytale import reference
from tinytale.reference import (
    bigram_loss,
    first_epoch_below,
    reference_levels,
    uniform_loss,
    unigram_loss,
)


def test_uniform_is_ln_v():
    assert uniform_loss(24) == pytest.approx(math.log(24))
    with pytest.raises(ValueError):
        uniform_loss(0)


def test_unigram_add_one_by_hand():
    # V = 3, train [0, 0, 0, 1]: counts (3, 1, 0) -> add-one (4, 2, 1) / 7.
    # Targets are val[1:] = [0, 2]: -(ln 4/7 + ln 1/7) / 2.
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert unigram_loss([0, 0, 0, 1], [1, 0, 2], 3) == pytest.approx(expected)


def test_bigram_backs_off_to_unigram_by_hand():
    # V = 2, train [0, 1, 0, 1]: unigram add-one (2+1, 2+1) / 6 = (1/2, 1/2).
    # Pairs: (0,1) twice, (1,0) once; contexts: 0 twice, 1 once.
    # p(1|0) = (2 + 1/2) / (2 + 1) = 5/6, p(0|1) = (1 + 1/2) / (1 + 1) = 3/4.
    expected = -(math.log(5 / 6) + math.log(3 / 4)) / 2
    assert bigram_loss([0, 1, 0, 1], [0, 1, 0], 2) == pytest.approx(expected)
    # A context never seen in training predicts exactly the unigram distribution.
    assert bigram_loss([0, 0], [1, 0], 2) == pytest.approx(unigram_loss([0, 0], [1, 0], 2))


def test_bigram_beats_unigram_on_a_deterministic_sequence():
    # 0 1 2 0 1 2 ...: every token equally frequent, but each one fixes the next.
    train, val = [0, 1, 2] * 20, [0, 1, 2] * 3
    levels = reference_levels(train, val, 3)
    assert levels.bigram < 0.1 < levels.unigram
    assert levels.unigram == pytest.approx(math.log(3), abs=1e-9)  # equal counts: uniform
    assert levels.params() == {"reference.uniform_loss": levels.uniform,
                               "reference.unigram_loss": levels.unigram,
                               "reference.bigram_loss": levels.bigram}


def test_sparse_counts_agree_with_dense(monkeypatch):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50, 2000), rng.integers(0, 50, 300)
    dense = bigram_loss(train, val, 50)
    monkeypatch.setattr(reference, "DENSE_PAIRS_MAX", 0)  # the large-vocabulary path
    assert bigram_loss(train, val, 50) == pytest.approx(dense, rel=1e-12)


def test_too_short_validation_has_no_level():
    assert math.isnan(unigram_loss([0, 1], [1], 2))
    assert math.isnan(bigram_loss([0, 1], [], 2))


def test_first_epoch_below():
    history = [(1, 3.0), (2, float("nan")), (3, 1.9), (4, 1.5)]
    assert first_epoch_below(history, 2.0) == 3
    assert first_epoch_below(history, 1.0) is None
    assert first_epoch_below(history, None) is None
    assert first_epoch_below(history, float("nan")) is None
