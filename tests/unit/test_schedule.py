"""Warmup + cosine learning-rate schedule."""

import math

import pytest

from tinytale.schedule import lr_at

MAX, MIN, WARM, TOTAL = 1e-3, 1e-4, 10, 110


def test_warmup_starts_at_zero_and_rises_linearly():
    assert lr_at(0, MAX, MIN, WARM, TOTAL) == 0.0
    assert lr_at(1, MAX, MIN, WARM, TOTAL) == pytest.approx(MAX / WARM)
    assert lr_at(5, MAX, MIN, WARM, TOTAL) == pytest.approx(MAX / 2)


def test_peak_at_end_of_warmup():
    assert lr_at(WARM, MAX, MIN, WARM, TOTAL) == pytest.approx(MAX)


def test_cosine_midpoint_and_end():
    mid = WARM + (TOTAL - WARM) // 2
    assert lr_at(mid, MAX, MIN, WARM, TOTAL) == pytest.approx((MAX + MIN) / 2)
    assert lr_at(TOTAL, MAX, MIN, WARM, TOTAL) == pytest.approx(MIN)
    assert lr_at(TOTAL + 50, MAX, MIN, WARM, TOTAL) == pytest.approx(MIN)


def test_decay_is_monotone_and_no_warmup_starts_at_peak():
    values = [lr_at(s, MAX, MIN, WARM, TOTAL) for s in range(WARM, TOTAL + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(0, MAX, MIN, 0, TOTAL) == pytest.approx(MAX)
    assert math.isclose(lr_at(TOTAL, MAX, MIN, 0, TOTAL), MIN)
