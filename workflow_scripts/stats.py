"""Uncertainty of a reproduced figure and the verdict against a published one. Pure functions, in %.

What an interval covers (README "How sure is each verdict"):
- test-set sampling: a Wilson score interval for a top-1 over the n test images (Wilson 1927; the
  interval statsmodels' proportion_confint(method="wilson") gives). The same test images are used by
  every seed, so n is the number of images, never images x seeds;
- with two or more seeds, the spread over seeds: a Student-t interval for the mean over seeds;
- the two combined by adding each side's half-widths in quadrature (independent sources of error).
It does not cover the published figure's own uncertainty (unknown), nor seed variance with one seed.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom (beyond: the normal quantile).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass(frozen=True)
class Interval:
    """A figure in % with a 95% interval [low, high] and how it was computed."""

    value: float
    low: float
    high: float
    method: str


def wilson(percent: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (in %) of a proportion observed as `percent` % of n trials."""
    if n <= 0:
        raise ValueError(f"a Wilson interval needs at least one trial, got n={n}")
    p = min(max(percent / 100.0, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def t95(dof: int) -> float:
    return T95[dof - 1] if dof <= len(T95) else Z95


def top1_interval(per_seed: list[float], n_images: int) -> Interval:
    """Mean top-1 over seeds with its interval: Wilson over the test images, plus the seed spread."""
    mean = statistics.fmean(per_seed)
    low, high = wilson(mean, n_images)
    if len(per_seed) < 2:
        return Interval(mean, low, high, f"Wilson over {n_images} test images (1 seed: seed variance not covered)")
    seed_half = t95(len(per_seed) - 1) * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
    low = mean - math.hypot(mean - low, seed_half)
    high = mean + math.hypot(high - mean, seed_half)
    return Interval(mean, max(0.0, low), min(100.0, high),
                    f"Wilson over {n_images} test images and t over {len(per_seed)} seeds, in quadrature")


def average_interval(members: list[Interval]) -> Interval:
    """The mean of figures on independent test sets; each side's half-width is sqrt(sum of squares) / k."""
    k = len(members)
    if k == 0:
        raise ValueError("an average needs at least one member")
    mean = statistics.fmean(m.value for m in members)
    low_half = math.sqrt(sum((m.value - m.low) ** 2 for m in members)) / k
    high_half = math.sqrt(sum((m.high - m.value) ** 2 for m in members)) / k
    return Interval(mean, mean - low_half, mean + high_half,
                    f"mean of {k} figures; half-widths combined as sqrt(sum of squares) / {k}")


def verdict(published: float | None, interval: Interval | None) -> tuple[str, float | None]:
    """("consistent" | "below" | "above" | "no reference" | "not run", ours - published)."""
    if interval is None:
        return "not run", None
    if published is None:
        return "no reference", None
    difference = interval.value - published
    if interval.low <= published <= interval.high:
        return "consistent", difference
    return ("below" if interval.high < published else "above"), difference


def difference_interval(a: Interval, b: Interval) -> Interval:
    """a - b with a 95% interval: each side's half-width is the two figures' half-widths in quadrature
    (a's lower with b's upper for the lower side), as for independent errors. Two results on the same test
    images tend to err together, so for them this interval is wider than needed (conservative)."""
    difference = a.value - b.value
    return Interval(difference, difference - math.hypot(a.value - a.low, b.high - b.value),
                    difference + math.hypot(a.high - a.value, b.value - b.low),
                    "difference; half-widths of the two intervals combined in quadrature")
