"""Permutation tests whose points are independent units: Friedman's test of methods within blocks and the
aligned-rank Spearman correlation within blocks, their p-values from permutations within each block (exact
when every permutation can be enumerated, else Monte Carlo). The study-mode H1-H5 tests
(:mod:`~kd_utils.statistics.study_tests`) and the exact tests over teachers (:mod:`~kd_utils.statistics.exact`)
are built on them.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.constants import ALPHA, N_RESAMPLES
from kd_utils.statistics.power import correlation_power, repeated_measures_power
from kd_utils.statistics.tolerances import INPUT_SCALE_TIE, RANK_DECIMALS, UNIT_SCALE_TIE


def friedman_test(table: pd.DataFrame, alpha: float = ALPHA, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Friedman test of treatments (columns) within blocks (rows; incomplete rows dropped), tie-corrected.

    The p-value permutes each block's ranks (Monte Carlo, (hits + 1) / (n_resamples + 1)):
    the chi-square approximation (``pvalue_asymptotic``) rejects too often with few blocks
    (5.8% at alpha = 0.05 with 9 pairs in a null simulation run before this p-value). Returns statistic
    (chi-square), pvalue, n (blocks), estimate (Kendall's W), power (approximate, for
    Cohen's medium f = 0.25) and note.
    """
    table = table.dropna()
    n, k = table.shape
    out = {"statistic": math.nan, "pvalue": math.nan, "n": int(n), "estimate": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "power": repeated_measures_power(n, k, alpha=alpha), "note": "",
           "pvalue_asymptotic": math.nan, "min_pvalue": math.nan}
    if k < 2 or n < 3:
        return out | {"note": f"not testable: {k} method(s), {n} complete block(s) (needs 2 and 3)"}
    # relabelling the methods the same way in every block leaves the statistic unchanged
    out["min_pvalue"] = max(1.0 / math.factorial(k) ** (n - 1), 1.0 / (n_resamples + 1))
    if out["min_pvalue"] > alpha:
        return out | {"power": 0.0, "note": f"not testable: {n} block(s) of {k} methods allow a smallest p of "
                                            f"{out['min_pvalue']:.3g} > {alpha}; needs more blocks (students)"}
    ranks = stats.rankdata(table.to_numpy(float), axis=1)
    ties = sum(((np.unique(r, return_counts=True)[1] ** 3) - np.unique(r, return_counts=True)[1]).sum() for r in ranks)
    correction = 1.0 - ties / (n * k * (k * k - 1))
    if correction <= 0:
        return out | {"note": "not testable: every block ties all methods"}

    def chi2(sums: np.ndarray) -> np.ndarray:
        return (12.0 / (n * k * (k + 1)) * (sums**2).sum(axis=-1) - 3.0 * n * (k + 1)) / correction

    observed = float(chi2(ranks.sum(axis=0)))
    order = np.argsort(np.random.default_rng(seed).random((n_resamples, n, k)), axis=2)
    permuted = np.take_along_axis(np.broadcast_to(ranks, (n_resamples, n, k)), order, axis=2).sum(axis=1)
    hits = int(np.sum(chi2(permuted) >= observed - INPUT_SCALE_TIE))
    return out | {"statistic": observed, "pvalue": (hits + 1) / (n_resamples + 1),
                  "estimate": observed / (n * (k - 1)), "pvalue_asymptotic": float(stats.chi2.sf(observed, k - 1))}


def centered_ranks(values: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Aligned ranks: values minus their block mean, ranked over all points (midranks), centred within blocks."""
    codes = np.unique(blocks, return_inverse=True)[1]
    sizes = np.bincount(codes)

    def centred(v: np.ndarray) -> np.ndarray:
        return v - (np.bincount(codes, weights=v) / sizes)[codes]

    return centred(stats.rankdata(np.round(centred(values), RANK_DECIMALS)))


@functools.lru_cache(maxsize=64)
def _block_permutations(sizes: tuple[int, ...]) -> np.ndarray:
    """Every within-block permutation of consecutive blocks of ``sizes``, as position arrays."""
    starts = np.cumsum((0,) + sizes[:-1])
    per_block = [[start + np.array(q) for q in itertools.permutations(range(size))]
                 for start, size in zip(starts, sizes)]
    return np.array([np.concatenate(p) for p in itertools.product(*per_block)])


def permutation_spearman(x: Sequence[float], y: Sequence[float], blocks: Sequence | None = None,
                         n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95, alpha: float = ALPHA,
                         alternative: str = "two-sided") -> dict:
    """Spearman rho stratified by blocks, with a two-sided permutation p-value permuting x within blocks.

    x and y are aligned (minus their block means), ranked over all points and the ranks
    centred within blocks (an aligned-rank correlation: a shift of a whole block, such as
    a student's shared SFT baseline, changes nothing, and the statistic is not as coarse
    as ranks within blocks of 3 would be).
    Without blocks this is Spearman's rho. Blocks with one point carry no within-block
    information and are dropped. The p-value is exact (all permutations) when there are
    at most ``n_resamples`` of them, else Monte Carlo ((hits + 1) / (n_resamples + 1)).
    scipy's asymptotic p-value would be wrong here: with 3 points it reports p = 0 for a
    perfect rank correlation, whose exact p is 1/3. The interval is Fisher's z with
    Bonett & Wright's variance (1 + rho^2 / 2) / (n_eff - 3), n_eff = within-block degrees
    of freedom + 1. A design whose smallest attainable p-value exceeds ``alpha`` is not
    testable. ``alternative`` "less" / "greater" counts one tail (a claimed direction).
    Returns statistic, pvalue, n, estimate, ci_low, ci_high, power (Cohen's medium rho =
    0.3), min_pvalue (the smallest the design allows), note, pvalue_asymptotic (scipy's,
    pooled, for reference).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    blocks_given = blocks is not None
    blocks = np.zeros(x.size, int) if blocks is None else np.asarray(blocks)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y, blocks = x[keep], y[keep], blocks[keep]
    names, sizes = np.unique(blocks, return_counts=True)
    multi = np.isin(blocks, names[sizes >= 2])
    x, y, blocks = x[multi], y[multi], blocks[multi]
    sizes = sizes[sizes >= 2]
    n = int(x.size)
    n_eff = int((sizes - 1).sum() + 1) if n else 0
    out = {"statistic": math.nan, "pvalue": math.nan, "n": n, "estimate": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "power": correlation_power(n_eff, alpha=alpha), "note": "",
           "pvalue_asymptotic": math.nan, "min_pvalue": math.nan}
    total = math.prod(math.factorial(int(s)) for s in sizes)
    sided = 2 if alternative == "two-sided" else 1
    out["min_pvalue"] = min(1.0, sided / total) if total <= n_resamples else 1.0 / (n_resamples + 1)
    if n < 3:
        within = " in blocks of 2 or more (compared within students)" if blocks_given else ""
        return out | {"note": f"not testable: {n} point(s){within} < 3"}
    if total <= n_resamples and sided / total > alpha:
        return out | {"power": 0.0, "note": f"not testable: {n} points allow {total} permutations, the smallest "
                                            f"attainable p-value is {sided / total:.2f} > {alpha}"}
    rx, ry = centered_ranks(x, blocks), centered_ranks(y, blocks)
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0:
        return out | {"note": "not testable: constant input within every block, rho undefined"}
    rho = float(rx @ ry) / denom
    order = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
    if total <= n_resamples:
        local = _block_permutations(tuple(idx.size for idx in order))
        perms = np.concatenate(order)[local]
    else:
        rng = np.random.default_rng(seed)
        perms = np.concatenate([idx[np.argsort(rng.random((n_resamples, idx.size)), axis=1)] for idx in order], axis=1)
    base = np.concatenate(order)
    permuted = np.empty((perms.shape[0], n))
    permuted[:, base] = rx[perms]
    # ties between permuted and observed |rho| count as hits despite rounding
    values = permuted @ ry / denom
    if alternative == "less":
        hits = int(np.sum(values <= rho + UNIT_SCALE_TIE))
    elif alternative == "greater":
        hits = int(np.sum(values >= rho - UNIT_SCALE_TIE))
    else:
        hits = int(np.sum(np.abs(values) >= abs(rho) - UNIT_SCALE_TIE))
    p = hits / len(perms) if total <= n_resamples else (hits + 1) / (n_resamples + 1)
    low = high = math.nan
    if n_eff > 3 and abs(rho) < 1:
        half = stats.norm.ppf(0.5 + level / 2) * math.sqrt((1 + rho**2 / 2) / (n_eff - 3))
        low, high = math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)
    asymptotic = float(stats.spearmanr(x, y).pvalue) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
    return out | {"statistic": rho, "pvalue": p, "estimate": rho, "ci_low": low, "ci_high": high,
                  "pvalue_asymptotic": asymptotic}


def spearman_permutation_pvalue(x: Sequence[float], y: Sequence[float], n_resamples: int = N_RESAMPLES,
                                seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman rho (exact for n! <= n_resamples); NaN for constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return permutation_spearman(x, y, n_resamples=n_resamples, seed=seed, alpha=1.0)["pvalue"]
