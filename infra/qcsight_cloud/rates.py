"""Tests on rates (defect rates, false-alarm rates) for the retraining policy; stdlib only.

- :func:`compare_rates`: is a recent rate different from its baseline? Two-sided; the pooled
  two-proportion score (z) test when every expected cell count is at least 5, Fisher's exact test
  otherwise (where the normal approximation is poor).
- :func:`exceeds_bound`: is a rate above a bound? One-sided binomial score test (the test whose
  inversion is the Wilson interval).

Both return p-values; the policy compares them with a stated alpha. tests/cloud/test_rates.py
checks them against scipy.stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()
# Expected cell count below which the z test's normal approximation is not trusted (the usual rule).
MIN_EXPECTED = 5.0
# Fisher's two-sided p sums tables at most as likely as the observed one; this relative slack keeps
# the observed table itself from being lost to rounding (the same tolerance scipy uses).
_FISHER_SLACK = 1 + 1e-7


@dataclass(frozen=True)
class RateTest:
    """The outcome of a rate test: the p-value and how it was computed."""

    p_value: float
    method: str  # "score" (z test) or "fisher" (exact)
    statistic: float | None = None  # z for the score test


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided Fisher exact p-value for x1/n1 against x2/n2 (the 2x2 table with fixed margins)."""
    total, events = n1 + n2, x1 + x2
    low, high = max(0, n2 - (total - events)), min(events, n2)
    base = _log_choose(total, n2)

    def log_pmf(k: int) -> float:
        return _log_choose(events, k) + _log_choose(total - events, n2 - k) - base

    observed = log_pmf(x2) + math.log(_FISHER_SLACK)
    p = 0.0
    for k in range(low, high + 1):
        value = log_pmf(k)
        if value <= observed:
            p += math.exp(value)
    return min(1.0, p)


def compare_rates(x1: int, n1: int, x2: int, n2: int) -> RateTest:
    """Two-sided test of x2/n2 (recent) against x1/n1 (baseline).

    Raises:
        ValueError: counts negative, events above trials, or a side with no trials.
    """
    for name, x, n in (("baseline", x1, n1), ("recent", x2, n2)):
        if n <= 0 or x < 0 or x > n:
            raise ValueError(f"{name}: {x} events in {n} trials is not a rate sample")
    total, events = n1 + n2, x1 + x2
    expected = min(n1, n2) * min(events, total - events) / total
    if expected < MIN_EXPECTED:
        return RateTest(fisher_exact(x1, n1, x2, n2), "fisher")
    pooled = events / total
    z = (x2 / n2 - x1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return RateTest(min(1.0, 2 * _NORMAL.cdf(-abs(z))), "score", z)


def exceeds_bound(x: int, n: int, bound: float) -> RateTest:
    """One-sided score test that the rate behind x events in n trials is above ``bound``.

    Raises:
        ValueError: no trials, x outside 0..n, or a bound outside (0, 1).
    """
    if n <= 0 or not 0 <= x <= n:
        raise ValueError(f"{x} events in {n} trials is not a rate sample")
    if not 0 < bound < 1:
        raise ValueError(f"bound {bound} must lie strictly between 0 and 1")
    z = (x - n * bound) / math.sqrt(n * bound * (1 - bound))
    return RateTest(_NORMAL.cdf(-z), "score", z)
