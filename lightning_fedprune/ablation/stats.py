"""The statistics behind the results page, on :mod:`scipy.stats`: pure functions of per-seed values.

Every comparison on the page is **paired by seed** (a seed fixes the initialisation, the cohorts and the
clients' data order for every configuration alike), so it works on the per-seed differences
``d_s = a_s - b_s``:

* :func:`paired_t` -- the two-sided paired t-test (``scipy.stats.ttest_rel``) with its confidence interval;
* :func:`tost` -- equivalence by two one-sided tests (TOST) against a margin ``±delta`` stated up front:
  significant when the difference is shown to lie inside ``(-delta, +delta)``;
* :func:`pitman_morgan` -- whether two paired samples have the same variance (the Pitman–Morgan test:
  ``var(a) = var(b)`` exactly when ``a + b`` and ``a - b`` are uncorrelated);
* :func:`holm` -- Holm–Bonferroni adjusted p-values over a family of tests;
* :func:`power_paired`, :func:`mde_paired`, :func:`required_n` -- the power of the two-sided paired t-test
  (noncentral t), the minimum detectable effect at a power, and the seeds a given effect needs.

>>> r = paired_t([0.12, 0.15, 0.11, 0.20], [0.10, 0.12, 0.10, 0.16])
>>> round(r.mean, 4), r.n, round(r.p, 4)
(0.025, 4, 0.0305)
>>> holm([0.01, 0.04, 0.03, 0.005])
[0.03, 0.06, 0.06, 0.02]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats


@dataclass(frozen=True)
class PairedT:
    """A paired t-test of ``a - b``: the mean difference, its standard deviation over the seeds, the
    two-sided p-value and the ``confidence`` interval of the mean difference."""

    n: int
    mean: float
    sd: float
    t: float
    df: int
    p: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _no_spread(d: np.ndarray) -> bool:
    """Whether the differences are all the same (up to rounding): the t statistic is then meaningless."""
    return float(d.std(ddof=1)) <= 1e-12 * max(1.0, float(np.abs(d).max()))


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D sequences of the same length, got {a.shape} and {b.shape}")
    return a - b


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedT:
    """The two-sided paired t-test of ``a`` against ``b`` (``scipy.stats.ttest_rel``) and the
    ``confidence`` interval of the mean difference ``a - b``. Needs at least 2 pairs.

    When every pair differs by exactly the same amount the test is degenerate (no spread): the
    p-value is 0 for a non-zero difference and 1 for none, and the interval is that one value.

    >>> r = paired_t([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    >>> r.p, r.ci_low, r.ci_high
    (1.0, 0.0, 0.0)
    """
    d = _diffs(a, b)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if _no_spread(d) or not math.isfinite(sd):
        return PairedT(n, mean, 0.0, math.copysign(math.inf, mean) if mean else 0.0, n - 1,
                       0.0 if mean else 1.0, mean, mean, confidence)
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence)
    return PairedT(n, mean, sd, float(res.statistic), int(res.df), float(res.pvalue), float(ci.low), float(ci.high),
                   confidence)


def tost(a: Sequence[float], b: Sequence[float], margin: float) -> float:
    """The p-value of equivalence within ``±margin`` of paired samples (two one-sided paired t-tests):
    the larger of the p-values of "mean(a - b) > -margin" and "mean(a - b) < +margin". Small means the
    difference is shown to lie inside the margin. Rejecting at level ``alpha`` is the same as the
    ``1 - 2 alpha`` confidence interval lying inside ``(-margin, +margin)``.

    >>> round(tost([0.101, 0.102, 0.099, 0.100], [0.100, 0.100, 0.100, 0.100], 0.01), 6)
    0.00034
    """
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin!r}")
    d = _diffs(a, b)
    if len(d) < 2:
        raise ValueError(f"an equivalence test needs at least 2 pairs, got {len(d)}")
    if _no_spread(d):
        return 0.0 if abs(float(d.mean())) < margin else 1.0
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(lower, upper))


@dataclass(frozen=True)
class VarianceTest:
    """The Pitman–Morgan test of equal variances of paired samples: ``ratio = var(a) / var(b)``,
    ``r`` the correlation of ``a + b`` with ``a - b``, ``p`` two-sided (``n - 2`` degrees of freedom)."""

    n: int
    sd_a: float
    sd_b: float
    ratio: float
    r: float
    p: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def pitman_morgan(a: Sequence[float], b: Sequence[float]) -> VarianceTest:
    """Whether paired samples ``a`` and ``b`` have the same variance (Pitman 1939, Morgan 1939).

    ``cov(a + b, a - b) = var(a) - var(b)``, so equal variances mean ``a + b`` and ``a - b`` are
    uncorrelated; the test is the t-test of their Pearson correlation (``scipy.stats.pearsonr``). Needs
    at least 3 pairs; when the sums or the differences do not vary the variances are exactly equal (``p = 1``).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    _diffs(a, b)
    n = len(a)
    if n < 3:
        raise ValueError(f"the Pitman–Morgan test needs at least 3 pairs, got {n}")
    sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    ratio = sd_a ** 2 / sd_b ** 2 if sd_b > 0 else math.inf if sd_a > 0 else math.nan
    s, d = a + b, a - b
    if _no_spread(s) or _no_spread(d):  # cov(a + b, a - b) = var(a) - var(b) = 0: the variances are equal
        return VarianceTest(n, sd_a, sd_b, ratio, 0.0, 1.0)
    res = stats.pearsonr(s, d)
    return VarianceTest(n, sd_a, sd_b, ratio, float(res.statistic), float(res.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down): sort the ``m`` p-values, multiply the ``k``-th
    smallest by ``m - k + 1``, keep them non-decreasing and at most 1. A test is rejected at family-wise
    level ``alpha`` when its adjusted p-value is below ``alpha``. NaN entries (tests not made) stay NaN
    and do not count in ``m``.

    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
    >>> holm([0.2, float("nan"), 0.01])
    [0.2, nan, 0.02]
    """
    values = [float(p) for p in pvalues]
    index = sorted((i for i, p in enumerate(values) if math.isfinite(p)), key=lambda i: values[i])
    m = len(index)
    out = [math.nan] * len(values)
    running = 0.0
    for k, i in enumerate(index):
        running = max(running, min(1.0, (m - k) * values[i]))
        out[i] = round(running, 15)
    return out


def power_paired(effect: float, sd: float, n: int, alpha: float) -> float:
    """The power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs when the true mean
    difference is ``effect`` and the differences' standard deviation ``sd`` (noncentral t, ``n - 1``
    degrees of freedom).

    >>> round(power_paired(0.5, 1.0, 34, 0.05), 3)  # Cohen's d = 0.5 needs 34 pairs for power 0.8
    0.808
    """
    if n < 2:
        return math.nan
    if sd == 0:
        return 1.0 if effect else alpha
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) / sd * math.sqrt(n)
    upper = float(stats.nct.sf(crit, df, nc))
    lower = float(stats.nct.cdf(-crit, df, nc))  # the wrong-sign rejections: below alpha / 2, vanishing as nc grows
    if math.isnan(upper):  # pragma: no cover (scipy's noncentral t is finite in the upper tail here)
        upper = float(stats.norm.sf(crit - nc))
    if math.isnan(lower):  # scipy underflows to NaN far in the lower tail, where the value is ~0
        lower = 0.0
    return min(1.0, upper + lower)


def mde_paired(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The minimum detectable effect: the smallest mean difference the two-sided paired t-test at level
    ``alpha`` with ``n`` pairs detects with probability ``power`` when the differences' standard deviation
    is ``sd``. NaN for fewer than 2 pairs or an unknown ``sd``; 0 when ``sd`` is 0.

    >>> round(mde_paired(1.0, 10, 0.05), 3)  # in units of sd: Cohen's d_z
    0.996
    """
    if n < 2 or not math.isfinite(sd) or not 0 < alpha < 1 or not 0 < power < 1:
        return math.nan
    if sd == 0:
        return 0.0
    hi = sd
    while power_paired(hi, sd, n, alpha) < power:
        hi *= 2
        if hi > 1e9 * sd:  # pragma: no cover (cannot happen for power < 1)
            return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(optimize.brentq(lambda e: power_paired(e, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def required_n(effect: float, sd: float, alpha: float, power: float = 0.8, max_n: int = 100_000) -> int | None:
    """The smallest number of pairs (>= 2) whose two-sided paired t-test at level ``alpha`` detects a mean
    difference ``effect`` with probability ``power`` (differences' standard deviation ``sd``); None when
    even ``max_n`` pairs do not.

    >>> required_n(0.5, 1.0, 0.05)
    34
    """
    if effect == 0 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while power_paired(effect, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > max_n:
            return None
    while lo < hi:  # power grows with n: the first n that reaches it
        mid = (lo + hi) // 2
        if power_paired(effect, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo
