"""Power of the study's tests: for Cohen's medium effects and for the design's effect of interest.

The effect of interest of H1 is a gain of ``GAIN_OF_INTEREST`` (3) percentage points;
correlations use Cohen's medium rho = 0.3 and the method comparison Cohen's medium
f = 0.25. A test whose power is below ``ADEQUATE_POWER`` (0.8) is *underpowered*:
a non-significant result of it says little.
"""

from __future__ import annotations

import math

from scipy import stats

from kd_utils.constants import ALPHA

# "medium" effects (Cohen): d = 0.5 for the t-test, f = 0.25 for the ANOVA, rho = 0.3 for Spearman
MEDIUM_EFFECT = {"ttest": 0.5, "anova": 0.25, "spearman": 0.3}
GAIN_OF_INTEREST = 3.0  # percentage points


def medium_effect_power(kind: str, n: int, k_groups: int = 3, alpha: float = ALPHA) -> float:
    """Power of a test on ``n`` points to detect a medium effect at ``alpha``.

    t-test: one-sided one-sample (statsmodels); ANOVA: ``k_groups`` groups (statsmodels);
    Spearman: two-sided, Fisher-z normal approximation with atanh(rho) * sqrt(n - 3).
    """
    from statsmodels.stats.power import FTestAnovaPower, TTestPower

    if kind == "ttest":
        return float(TTestPower().power(MEDIUM_EFFECT[kind], nobs=n, alpha=alpha, alternative="larger")) if n > 1 \
            else math.nan
    if kind == "anova":
        return float(FTestAnovaPower().power(MEDIUM_EFFECT[kind], nobs=n, alpha=alpha, k_groups=k_groups)) \
            if n > k_groups else math.nan
    return correlation_power(n, MEDIUM_EFFECT[kind], alpha)


def correlation_power(n_effective: float, rho: float = MEDIUM_EFFECT["spearman"], alpha: float = ALPHA) -> float:
    """Two-sided power to detect a correlation ``rho``: Fisher-z normal approximation, atanh(rho) * sqrt(n - 3)."""
    if not n_effective > 3:
        return math.nan
    shift, z = math.atanh(rho) * math.sqrt(n_effective - 3), stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))


def ttest_power(n: int, effect: float, sd: float, alpha: float = ALPHA, alternative: str = "larger") -> float:
    """Power of the one-sample t-test on ``n`` units to detect a mean ``effect`` when units spread with ``sd``."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not sd > 0:
        return math.nan
    return float(TTestPower().power(effect / sd, nobs=n, alpha=alpha, alternative=alternative))


def repeated_measures_power(n_blocks: int, k: int, f: float = MEDIUM_EFFECT["anova"], alpha: float = ALPHA) -> float:
    """Approximate power of a k-treatment comparison within ``n_blocks`` blocks (the Friedman test's
    parametric counterpart, a repeated-measures F test) for Cohen's effect size ``f``."""
    if n_blocks < 2 or k < 2:
        return math.nan
    df1, df2 = k - 1, (k - 1) * (n_blocks - 1)
    critical = stats.f.ppf(1 - alpha, df1, df2)
    return float(stats.ncf.sf(critical, df1, df2, n_blocks * k * f**2))
