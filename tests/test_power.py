"""kd_utils.statistics.power against values computed here from the textbook formulas (scipy's
noncentral t and F distributions and the normal distribution), not from statsmodels."""

import math

import pytest
from scipy import stats

from kd_utils.constants import ADEQUATE_POWER
from kd_utils.statistics.power import (
    GAIN_OF_INTEREST,
    correlation_power,
    medium_effect_power,
    repeated_measures_power,
    ttest_power,
)


def one_sample_t_power(n: int, d: float, alpha: float, two_sided: bool = False) -> float:
    """P(reject) of the one-sample t-test when the mean is d standard deviations: noncentral t, delta = d sqrt(n)."""
    df, delta = n - 1, d * math.sqrt(n)
    if two_sided:
        critical = stats.t.ppf(1 - alpha / 2, df)
        return stats.nct.sf(critical, df, delta) + stats.nct.cdf(-critical, df, delta)
    return stats.nct.sf(stats.t.ppf(1 - alpha, df), df, delta)


def fisher_z_power(n: float, rho: float, alpha: float) -> float:
    shift = math.atanh(rho) * math.sqrt(n - 3)
    z = stats.norm.ppf(1 - alpha / 2)
    return stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift)


def test_the_design_constants():
    # the verdicts and the report state these numbers in words
    assert ADEQUATE_POWER == 0.8 and GAIN_OF_INTEREST == 3.0


@pytest.mark.parametrize("n", [2, 10, 30])
def test_medium_effect_ttest_is_one_sided_with_d_one_half(n):
    assert medium_effect_power("ttest", n) == pytest.approx(one_sample_t_power(n, 0.5, 0.05), rel=1e-6)
    assert medium_effect_power("ttest", n, alpha=0.01) == pytest.approx(one_sample_t_power(n, 0.5, 0.01), rel=1e-6)


def test_medium_effect_ttest_at_n_30_by_hand():
    # noncentrality 0.5 * sqrt(30) = 2.74 against t_0.95(29) = 1.70: 0.848, a little below the normal
    # approximation Phi(2.74 - 1.645) = 0.863
    assert medium_effect_power("ttest", 30) == pytest.approx(0.8483, abs=5e-4)


def test_medium_effect_anova_with_f_one_quarter_and_three_groups_by_default():
    def anova_power(n, k, alpha=0.05):  # noncentral F, lambda = f^2 * N, df (k - 1, N - k)
        return stats.ncf.sf(stats.f.ppf(1 - alpha, k - 1, n - k), k - 1, n - k, 0.25**2 * n)

    assert medium_effect_power("anova", 4) == pytest.approx(anova_power(4, 3), rel=1e-6)
    assert medium_effect_power("anova", 60) == pytest.approx(anova_power(60, 3), rel=1e-6)
    assert medium_effect_power("anova", 60, k_groups=4) == pytest.approx(anova_power(60, 4), rel=1e-6)
    assert medium_effect_power("anova", 60, alpha=0.01) == pytest.approx(anova_power(60, 3, 0.01), rel=1e-6)


def test_medium_effect_spearman_uses_rho_0_3_and_fisher_z():
    # n = 28: shift = atanh(0.3) * 5 = 1.5476; 1.96 - 1.5476 = 0.4124 -> 0.3400, plus the lower tail 0.0002
    assert medium_effect_power("spearman", 28) == pytest.approx(0.3402, abs=2e-4)
    assert medium_effect_power("spearman", 28, alpha=0.1) == pytest.approx(fisher_z_power(28, 0.3, 0.1), rel=1e-9)


def test_too_few_points_have_no_power():
    assert math.isnan(medium_effect_power("ttest", 1))
    assert math.isnan(medium_effect_power("anova", 3))  # n must exceed the number of groups
    assert math.isnan(medium_effect_power("anova", 4, k_groups=4))
    assert not math.isnan(medium_effect_power("anova", 5, k_groups=4))
    assert math.isnan(medium_effect_power("spearman", 3))
    assert math.isnan(correlation_power(3.0))


def test_correlation_power_defaults_and_both_tails():
    assert correlation_power(3.5) == pytest.approx(fisher_z_power(3.5, 0.3, 0.05), rel=1e-9)
    assert correlation_power(50) == pytest.approx(fisher_z_power(50, 0.3, 0.05), rel=1e-9)
    # a negative rho has the same two-sided power; the lower tail carries it
    assert correlation_power(50, -0.3) == pytest.approx(correlation_power(50, 0.3), rel=1e-9)
    assert correlation_power(50, -0.3) > 0.5
    assert correlation_power(20, 0.5, alpha=0.01) == pytest.approx(fisher_z_power(20, 0.5, 0.01), rel=1e-9)
    # rho = 0: the size of the test
    assert correlation_power(40, 0.0) == pytest.approx(0.05, abs=1e-12)


def test_ttest_power_is_in_units_of_the_spread():
    # a 3-point gain with sd 6 is d = 0.5
    assert ttest_power(12, 3.0, 6.0) == pytest.approx(one_sample_t_power(12, 0.5, 0.05), rel=1e-6)
    assert ttest_power(12, 3.0, 6.0, alpha=0.1) == pytest.approx(one_sample_t_power(12, 0.5, 0.1), rel=1e-6)
    assert ttest_power(12, 3.0, 6.0, alternative="two-sided") == pytest.approx(
        one_sample_t_power(12, 0.5, 0.05, two_sided=True), rel=1e-6)
    assert ttest_power(2, 3.0, 6.0) == pytest.approx(one_sample_t_power(2, 0.5, 0.05), rel=1e-6)
    assert ttest_power(12, 0.3, 0.6) == pytest.approx(one_sample_t_power(12, 0.5, 0.05), rel=1e-6)  # sd below 1
    assert math.isnan(ttest_power(1, 3.0, 6.0))
    assert math.isnan(ttest_power(12, 3.0, 0.0))
    assert math.isnan(ttest_power(12, 3.0, math.nan))


def test_repeated_measures_power_with_two_treatments_is_the_paired_t_test():
    # k = 2: F(1, n - 1) is the square of the paired t, noncentrality n * k * f^2 = delta^2
    n, f = 10, 0.25
    delta = math.sqrt(n * 2 * f**2)
    critical = stats.t.ppf(0.975, n - 1)
    paired = stats.nct.sf(critical, n - 1, delta) + stats.nct.cdf(-critical, n - 1, delta)
    assert repeated_measures_power(n, 2) == pytest.approx(paired, rel=1e-5)
    assert repeated_measures_power(n, 2, f=0.5) == pytest.approx(
        stats.nct.sf(critical, n - 1, 0.5 * math.sqrt(2 * n)) + stats.nct.cdf(-critical, n - 1, 0.5 * math.sqrt(2 * n)),
        rel=1e-5)


def test_repeated_measures_power_degrees_of_freedom():
    # 10 blocks of 4 treatments: df (3, 27), noncentrality 10 * 4 * 0.0625 = 2.5
    expected = stats.ncf.sf(stats.f.ppf(0.95, 3, 27), 3, 27, 2.5)
    assert repeated_measures_power(10, 4) == pytest.approx(expected, rel=1e-9)
    expected = stats.ncf.sf(stats.f.ppf(0.99, 3, 27), 3, 27, 2.5)
    assert repeated_measures_power(10, 4, alpha=0.01) == pytest.approx(expected, rel=1e-9)
    assert not math.isnan(repeated_measures_power(2, 2))
    assert math.isnan(repeated_measures_power(1, 4))
    assert math.isnan(repeated_measures_power(10, 1))
