"""The statistics of the results page against known values: R's paired t-test on Student's sleep data,
scipy itself, Holm's adjusted p-values by hand, G*Power's sample sizes, and simulations of the error rates
and the power the functions promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_fedprune.ablation import stats as S

# Cushny & Peebles via Student (1908): extra hours of sleep of 10 patients under two drugs (R's `sleep`)
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_reproduces_r_on_the_sleep_data():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)
    #    t = -4.0621, df = 9, p-value = 0.002833, 95 percent CI -2.4598858 -0.7001142, mean difference -1.58
    r = S.paired_t(DRUG1, DRUG2)
    assert r.n == 10 and r.df == 9
    assert r.t == pytest.approx(-4.0621, abs=1e-4) and r.p == pytest.approx(0.002833, abs=1e-6)
    assert r.mean == pytest.approx(-1.58) and r.ci_low == pytest.approx(-2.4598858, abs=1e-7)
    assert r.ci_high == pytest.approx(-0.7001142, abs=1e-7)
    r90 = S.paired_t(DRUG1, DRUG2, confidence=0.90)
    assert r90.ci_low > r.ci_low and r90.ci_high < r.ci_high and r90.p == r.p


def test_paired_t_agrees_with_scipy_and_handles_no_spread():
    rng = np.random.default_rng(0)
    a = rng.normal(0.1, 0.03, 12)
    b = a + rng.normal(0.01, 0.01, 12)
    ref = stats.ttest_rel(a, b)
    r = S.paired_t(a, b)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-12) and r.t == pytest.approx(ref.statistic, rel=1e-12)
    assert r.sd == pytest.approx(np.std(a - b, ddof=1))
    same = S.paired_t([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert (same.p, same.ci_low, same.ci_high) == (1.0, 0.0, 0.0)
    shifted = S.paired_t([0.1, 0.2, 0.3], [0.15, 0.25, 0.35])
    assert shifted.p == 0.0 and shifted.mean == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        S.paired_t([0.1], [0.2])
    with pytest.raises(ValueError, match="same length"):
        S.paired_t([0.1, 0.2], [0.2])


def test_tost_is_two_one_sided_t_tests_and_matches_the_confidence_interval():
    d = np.asarray(DRUG1) - np.asarray(DRUG2)
    n, mean, se = len(d), d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    for margin in (0.5, 2.0, 2.5, 3.0):
        by_hand = max(stats.t.sf((mean + margin) / se, n - 1), stats.t.cdf((mean - margin) / se, n - 1))
        p = S.tost(DRUG1, DRUG2, margin)
        assert p == pytest.approx(by_hand, rel=1e-10)
        # duality: TOST rejects at alpha exactly when the (1 - 2 alpha) interval lies inside the margin
        ci = S.paired_t(DRUG1, DRUG2, confidence=0.90)
        assert (p < 0.05) == (-margin < ci.ci_low and ci.ci_high < margin)
    assert S.tost(DRUG1, DRUG2, 2.0) == pytest.approx(0.1541, abs=1e-4)  # (-1.58 - 2) / 0.38897 = -1.0798, t(9)
    assert S.tost([0.1, 0.2], [0.1, 0.2], 0.01) == 0.0 and S.tost([0.1, 0.2], [0.2, 0.3], 0.01) == 1.0
    with pytest.raises(ValueError, match="margin must be > 0"):
        S.tost(DRUG1, DRUG2, 0.0)


def test_tost_error_rate_at_the_margin_is_at_most_alpha():
    """Two methods that truly differ by exactly the margin are declared equivalent at most 5 % of the time."""
    rng = np.random.default_rng(1)
    hits = sum(S.tost(rng.normal(0.01, 0.02, 10), np.zeros(10), 0.01) < 0.05 for _ in range(2000))
    assert hits / 2000 <= 0.05 + 0.015


def test_holm_adjusted_p_values_by_hand():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == [0.03, 0.06, 0.06, 0.02]
    assert S.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert S.holm([0.02]) == [0.02]
    out = S.holm([0.04, math.nan, 0.01])
    assert out[0] == 0.04 and math.isnan(out[1]) and out[2] == 0.02  # NaN is no test: m = 2
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 0.2, 30)
    adjusted = S.holm(p)
    assert all(a >= b for a, b in zip(adjusted, p))  # never below the raw p-value
    assert all(a <= min(1.0, 30 * b) + 1e-15 for a, b in zip(adjusted, p))  # never above Bonferroni
    order = np.argsort(p)
    assert all(adjusted[i] <= adjusted[j] for i, j in zip(order, order[1:]))  # monotone in the raw order


def test_power_and_sample_sizes_match_g_power():
    # G*Power, "Means: difference between two dependent means (matched pairs)", two-tailed, alpha 0.05:
    # d_z = 0.5 needs 34 pairs (actual power 0.8078), d_z = 0.8 needs 15
    assert S.power_paired(0.5, 1.0, 34, 0.05) == pytest.approx(0.8078, abs=1e-4)
    assert S.required_n(0.5, 1.0, 0.05) == 34 and S.required_n(0.8, 1.0, 0.05) == 15
    assert S.required_n(0.05, 0.1, 0.05) == 34  # only the ratio matters
    assert S.required_n(0.5, 1.0, 0.05 / 20) > S.required_n(0.5, 1.0, 0.05)  # a stricter level needs more
    assert S.required_n(0.0, 1.0, 0.05) is None and S.required_n(0.5, 0.0, 0.05) == 2


def test_mde_is_where_the_power_reaches_the_target_and_a_simulation_agrees():
    sd, n, alpha = 0.02, 10, 0.05 / 8
    mde = S.mde_paired(sd, n, alpha, 0.8)
    assert S.power_paired(mde, sd, n, alpha) == pytest.approx(0.8, abs=1e-9)
    assert S.mde_paired(sd, 2 * n, alpha) < mde < S.mde_paired(2 * sd, n, alpha)
    rng = np.random.default_rng(3)
    d = rng.normal(mde, sd, (20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.015)
    assert math.isnan(S.mde_paired(sd, 1, alpha)) and math.isnan(S.mde_paired(math.nan, n, alpha))
    assert S.mde_paired(0.0, n, alpha) == 0.0


def test_pitman_morgan_is_the_correlation_test_of_sum_and_difference():
    rng = np.random.default_rng(4)
    a = rng.normal(0, 1, 15)
    b = 0.5 * a + rng.normal(0, 2, 15)
    r = S.pitman_morgan(a, b)
    rho, p = stats.pearsonr(a + b, a - b)
    t = rho * math.sqrt(13) / math.sqrt(1 - rho ** 2)
    assert r.r == pytest.approx(rho) and r.p == pytest.approx(p) and r.p == pytest.approx(2 * stats.t.sf(abs(t), 13))
    assert r.ratio == pytest.approx(np.var(a, ddof=1) / np.var(b, ddof=1)) and r.ratio < 1
    with pytest.raises(ValueError, match="at least 3 pairs"):
        S.pitman_morgan([1.0, 2.0], [1.0, 3.0])
    assert S.pitman_morgan([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]).p == 1.0  # a - b does not vary: equal variances


def test_pitman_morgan_false_positive_rate_with_equal_variances_is_alpha():
    rng = np.random.default_rng(5)
    common = rng.normal(0, 1, (3000, 10))  # the seed effect both share
    a = common + rng.normal(0, 0.5, (3000, 10))
    b = common + rng.normal(0, 0.5, (3000, 10))
    rate = np.mean([S.pitman_morgan(x, y).p < 0.05 for x, y in zip(a, b)])
    assert rate == pytest.approx(0.05, abs=0.015)
