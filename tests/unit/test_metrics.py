"""Perplexity from a loss: exp, but inf where float32 would overflow (and for NaN)."""

import math

import pytest

from tinytale.metrics import PERPLEXITY_MAX_LOSS, perplexity


def test_perplexity_is_exp_up_to_float32s_range_then_inf() -> None:
    assert perplexity(0.8) == pytest.approx(math.exp(0.8))
    assert perplexity(PERPLEXITY_MAX_LOSS) == pytest.approx(math.exp(PERPLEXITY_MAX_LOSS))
    assert perplexity(460.0) == math.inf
    assert perplexity(math.nan) == math.inf
