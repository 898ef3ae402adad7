"""Intervals and verdicts (workflow_scripts/stats.py) against known values and at their boundaries."""
from __future__ import annotations

import math

import pytest

from workflow_scripts import stats


@pytest.mark.parametrize("percent, n, low, high", [
    (0.0, 10, 0.0, 27.753),        # 0 of 10: upper bound z^2 / (n + z^2)
    (100.0, 10, 72.247, 100.0),    # 10 of 10
    (50.0, 10, 23.659, 76.341),
    (50.0, 100, 40.383, 59.617),
    (95.0, 10000, 94.555, 95.410),
])
def test_wilson_matches_known_values(percent, n, low, high):
    assert stats.wilson(percent, n) == pytest.approx((low, high), abs=1e-3)


def test_wilson_needs_trials():
    with pytest.raises(ValueError, match="at least one trial"):
        stats.wilson(50.0, 0)


def test_one_seed_is_the_wilson_interval_and_says_what_it_misses():
    one = stats.top1_interval([80.0], 1000)
    assert (one.low, one.high) == pytest.approx(stats.wilson(80.0, 1000))
    assert "seed variance not covered" in one.method


def test_seed_spread_widens_the_interval_in_quadrature():
    per_seed = [79.0, 81.0, 80.0]
    both = stats.top1_interval(per_seed, 1000)
    w_low, w_high = stats.wilson(80.0, 1000)
    seed_half = 4.303 * 1.0 / math.sqrt(3)  # t(2) x sample std 1.0 / sqrt(3)
    assert both.value == pytest.approx(80.0)
    assert both.low == pytest.approx(80.0 - math.hypot(80.0 - w_low, seed_half))
    assert both.high == pytest.approx(80.0 + math.hypot(w_high - 80.0, seed_half))
    assert both.low < w_low and both.high > w_high


def test_average_interval_combines_independent_members():
    a = stats.Interval(90.0, 88.0, 91.0, "")
    b = stats.Interval(70.0, 67.0, 72.0, "")
    avg = stats.average_interval([a, b])
    assert avg.value == 80.0
    assert avg.low == pytest.approx(80.0 - math.hypot(2.0, 3.0) / 2)
    assert avg.high == pytest.approx(80.0 + math.hypot(1.0, 2.0) / 2)


@pytest.mark.parametrize("published, expected", [
    (76.0, ("consistent", 0.0)), (75.0, ("consistent", 1.0)), (77.0, ("consistent", -1.0)),  # both ends included
    (77.01, ("below", -1.01)), (74.99, ("above", 1.01)), (None, ("no reference", None)),
])
def test_verdict_boundaries(published, expected):
    kind, diff = stats.verdict(published, stats.Interval(76.0, 75.0, 77.0, ""))
    assert kind == expected[0]
    assert diff == (None if expected[1] is None else pytest.approx(expected[1]))


def test_verdict_of_a_figure_that_was_not_run():
    assert stats.verdict(76.44, None) == ("not run", None)


def test_difference_interval_adds_half_widths_in_quadrature():
    variant = stats.Interval(80.0, 78.0, 81.0, "")
    paper_protocol = stats.Interval(82.0, 81.5, 84.0, "")
    diff = stats.difference_interval(variant, paper_protocol)
    assert diff.value == pytest.approx(-2.0)
    assert diff.low == pytest.approx(-2.0 - math.hypot(2.0, 2.0))  # variant's lower, paper's upper half-width
    assert diff.high == pytest.approx(-2.0 + math.hypot(1.0, 0.5))
    assert "quadrature" in diff.method
