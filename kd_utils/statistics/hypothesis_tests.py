"""Hypothesis tests H1-H5: the paper's procedure as published, and the valid study-mode procedure.

**As published** (:func:`hypothesis_tests`, on the "best"-temperature improvement
table): every (teacher, student, method) row is a point, scipy's t-test, ANOVA and
Spearman. This reproduces the paper's statistics; its temperature was chosen on the
test set and its rows are not independent, so it is not a valid basis for inference.

**Valid** (:func:`study_hypothesis_tests`, on the "mean"-temperature table): tests count
the units the design has. Every student has one SFT run (and one size) shared by all of its
teacher and method rows, and every teacher is shared by its students, so

- H1 (improvement > 0): exact one-sided sign-flip test over *students* (each the mean of
  its pairs and methods), its interval the same test inverted;
- H1 across methods: Friedman test with *students* as blocks (method effects vary by student);
- H2, H4, H5 (teacher accuracy, agreement beyond item difficulty, BLEU; per pair): aligned-rank
  Spearman within students, p-value from relabelling whole *teachers* jointly across students
  (:mod:`kd_utils.statistics.exact`), so a teacher effect on the gain cannot pass for a correlation;
- H3 (student size; student SFT accuracy): Spearman over *students*, one-sided in the paper's
  direction, exact permutation p-value; against SFT accuracy only when it is measured apart
  from the gain (:func:`~kd_utils.statistics.improvements.independent_sft_accuracy`).

Conventions for both: a test with too few points, or on constant input, gets NaN
statistic and p-value and a ``note`` starting "not testable", and so does a test whose
smallest attainable p-value exceeds alpha (with what would make it testable); tests whose
power for their effect of interest is below 0.8 are noted "underpowered".
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
from kd_utils.statistics.power import (
    ADEQUATE_POWER,
    GAIN_OF_INTEREST,
    MEDIUM_EFFECT,
    correlation_power,
    medium_effect_power,
    repeated_measures_power,
    ttest_power,
)
from kd_utils.statistics.results import sort_rows

TEST_COLUMNS = ("domain", "hypothesis", "method", "task", "statistic", "pvalue", "n")
STUDY_TEST_COLUMNS = TEST_COLUMNS + (
    "pvalue_holm", "note", "power", "effect_of_interest", "estimate", "ci_low", "ci_high", "unit", "test",
    "pvalue_asymptotic", "pvalue_selected", "alternative", "min_pvalue")

# (hypothesis, test kind, x column, includes the `average` task): the paper's procedure
HYPOTHESES = (
    ("H1_improvement_ttest", "ttest", None, True),
    ("H1_method_anova", "anova", None, True),
    ("H2_teacher_performance", "spearman", "teacher_accuracy", True),
    ("H3_student_size", "spearman", "student_size", True),
    ("H3_student_sft", "spearman", "sft_accuracy", True),
    ("H4_agreement", "spearman", "agreement", False),
    ("H5_fidelity", "spearman", "bleu", False),
)

TestResult = tuple[float, float, str]


# --------------------------------------------------------------------------- multiple testing


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same values as statsmodels' multipletests(method="holm")).

    Computed here because statsmodels runs gc.collect() on every Holm call (~0.1 s),
    and a report adjusts dozens of families.
    """
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def holm_adjust(tests: pd.DataFrame, family: Sequence[str] = ("domain", "hypothesis", "method"),
                pvalue: str = "pvalue") -> pd.DataFrame:
    """Add ``pvalue_holm``: Holm's step-down adjustment within each family (default: across tasks).

    The family includes the ``average`` row (Holm is valid under any dependence, so
    this only makes it more conservative); rows without a p-value stay NaN and do not
    count towards the family size.
    """
    out = tests.copy()
    out["pvalue_holm"] = math.nan
    for _, group in out.groupby(list(family), dropna=False):
        valid = group[pvalue].notna()
        if valid.any():
            idx = group.index[valid.to_numpy()]
            out.loc[idx, "pvalue_holm"] = holm(group.loc[idx, pvalue])
    return out


# --------------------------------------------------------------------------- the paper's procedure


def improvement_ttest(improvement: Sequence[float]) -> TestResult:
    """H1: one-sample t-test of mean improvement > 0 (one-sided); returns (t, p, note).

    Identical improvements give NaN and a note: t is undefined (scipy would return inf).
    """
    y = np.asarray(improvement, float)
    if np.ptp(y) == 0:
        return math.nan, math.nan, "not testable: constant improvement (zero variance)"
    res = stats.ttest_1samp(y, 0.0, alternative="greater")
    return float(res.statistic), float(res.pvalue), ""


def method_anova(groups: Sequence[Sequence[float]]) -> TestResult:
    """H1: one-way ANOVA of improvement across methods (one group per method); returns (F, p, note)."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    n = sum(g.size for g in groups)
    if len(groups) < 2 or n <= len(groups):
        return math.nan, math.nan, f"not testable: {len(groups)} method(s), {n} point(s)"
    if all(np.ptp(g) == 0 for g in groups):
        return math.nan, math.nan, "not testable: no variance within methods"
    res = stats.f_oneway(*groups)
    return float(res.statistic), float(res.pvalue), ""


def spearman(x: Sequence[float], y: Sequence[float]) -> TestResult:
    """H2-H5: Spearman rank correlation (two-sided p); constant input gives NaN and a note (rho undefined)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, "not testable: constant input, Spearman rho undefined"
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), ""


def _published_test(kind: str, data: pd.DataFrame, x: str | None, min_points: int) -> tuple[float, float, int, str, float]:
    """One test of the paper's procedure on the rows of ``data`` without NaN: (statistic, p, n, note, power)."""
    data = data.dropna(subset=["improvement"] + ([x] if x else []))
    n = len(data)
    if n < min_points:
        return math.nan, math.nan, n, f"not testable: {n} point(s) < {min_points}", math.nan
    if kind == "ttest":
        result = improvement_ttest(data["improvement"])
    elif kind == "anova":
        result = method_anova([g["improvement"] for _, g in data.groupby("method")])
    else:
        result = spearman(data[x], data["improvement"])
    power = medium_effect_power(kind, n, data["method"].nunique() if kind == "anova" else 3)
    note = result[2]
    if not note and not power >= ADEQUATE_POWER:
        note = f"underpowered: {n} points, power {power:.2f} for a medium effect ({kind} {MEDIUM_EFFECT[kind]})"
    return result[0], result[1], n, note, power


def _domain_levels(dom: pd.DataFrame) -> tuple[list[str], list[str]]:
    tasks = sort_rows(dom[["task"]].drop_duplicates(), ["task"])["task"].tolist()
    methods = sort_rows(dom[["method"]].drop_duplicates(), ["method"])["method"].tolist()
    return tasks, methods


def hypothesis_tests(improvements: pd.DataFrame, min_points: int = 3, per_method: bool = True) -> pd.DataFrame:
    """H1-H5 as the paper computed them, per domain, hypothesis, method (``all`` pooled, then each) and task.

    Every improvement row is a point. H1_improvement_ttest: one-sample t-test of
    improvement > 0 (one-sided); H1_method_anova: one-way ANOVA across methods (``all``
    only); H2 / H3 / H3 / H4 / H5: scipy Spearman of improvement with the teacher's
    accuracy / student size (B) / the student's SFT accuracy / agreement / BLEU (H4, H5
    without ``average``; emitted only where the column has data). Returns columns
    domain, hypothesis, method, task, statistic, pvalue, n, note, power (for a medium
    effect). On the "best"-temperature table of the paper's results this reproduces
    the published statistics; it is not valid inference (see the module docstring).
    ``per_method=False`` keeps the pooled rows only.
    """
    rows = []
    for domain, dom in sort_rows(improvements, ["domain"]).groupby("domain", sort=False):
        tasks, methods = _domain_levels(dom)
        for hypothesis, kind, x, with_average in HYPOTHESES:
            if x is not None and (x not in dom.columns or dom[x].isna().all()):
                continue
            for method in ["all"] + ([] if kind == "anova" or not per_method else methods):
                subset = dom if method == "all" else dom[dom["method"] == method]
                for task in tasks:
                    if task == "average" and not with_average:
                        continue
                    stat, p, n, note, power = _published_test(kind, subset[subset["task"] == task], x, min_points)
                    rows.append({"domain": domain, "hypothesis": hypothesis, "method": method, "task": task,
                                 "statistic": stat, "pvalue": p, "n": n, "note": note, "power": power})
    return pd.DataFrame(rows, columns=list(TEST_COLUMNS) + ["note", "power"])


# --------------------------------------------------------------------------- valid building blocks


def unit_ttest(values: Sequence[float], alternative: str = "greater", effect: float = GAIN_OF_INTEREST,
               level: float = 0.95, alpha: float = ALPHA, min_units: int = 3) -> dict:
    """One-sample t-test of independent unit means against 0, with a t interval and the power for ``effect``.

    ``alternative`` "greater" (H1) or "two-sided"; the power is for a true mean of
    ``effect`` at the units' observed spread. Returns statistic, pvalue, n, estimate,
    ci_low, ci_high, power, note.
    """
    y = np.asarray(values, float)
    y = y[~np.isnan(y)]
    out = {"statistic": math.nan, "pvalue": math.nan, "n": int(y.size), "estimate": float(y.mean()) if y.size else
           math.nan, "ci_low": math.nan, "ci_high": math.nan, "power": math.nan, "note": ""}
    if y.size < min_units:
        return out | {"note": f"not testable: {y.size} unit(s) < {min_units}"}
    if np.allclose(y, y[0], rtol=0.0, atol=1e-9):
        return out | {"note": "not testable: constant values (zero variance)"}
    sd = float(y.std(ddof=1))
    se = sd / math.sqrt(y.size)
    t = float(y.mean()) / se
    p = stats.t.sf(t, y.size - 1) if alternative == "greater" else 2 * stats.t.sf(abs(t), y.size - 1)
    half = stats.t.ppf(0.5 + level / 2, y.size - 1) * se
    power = ttest_power(y.size, effect, sd, alpha, "larger" if alternative == "greater" else "two-sided")
    return out | {"statistic": t, "pvalue": float(p), "ci_low": float(y.mean()) - half,
                  "ci_high": float(y.mean()) + half, "power": power}


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
    hits = int(np.sum(chi2(permuted) >= observed - 1e-9))
    return out | {"statistic": observed, "pvalue": (hits + 1) / (n_resamples + 1),
                  "estimate": observed / (n * (k - 1)), "pvalue_asymptotic": float(stats.chi2.sf(observed, k - 1))}


def _centered_ranks(values: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Aligned ranks: values minus their block mean, ranked over all points (midranks), centred within blocks."""
    codes = np.unique(blocks, return_inverse=True)[1]
    sizes = np.bincount(codes)

    def centred(v: np.ndarray) -> np.ndarray:
        return v - (np.bincount(codes, weights=v) / sizes)[codes]

    return centred(stats.rankdata(np.round(centred(values), 9)))


@functools.lru_cache(maxsize=64)
def _block_permutations(sizes: tuple[int, ...]) -> np.ndarray:
    """Every within-block permutation of consecutive blocks of ``sizes``, as position arrays."""
    starts = np.cumsum((0,) + sizes[:-1])
    per_block = [[start + np.array(q) for q in itertools.permutations(range(size))] for start, size in zip(starts, sizes)]
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
    rx, ry = _centered_ranks(x, blocks), _centered_ranks(y, blocks)
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
    # tolerance: ties between permuted and observed |rho| must count as hits despite rounding
    values = permuted @ ry / denom
    hits = int(np.sum(values <= rho + 1e-12) if alternative == "less" else np.sum(values >= rho - 1e-12)
               if alternative == "greater" else np.sum(np.abs(values) >= abs(rho) - 1e-12))
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


# --------------------------------------------------------------------------- the valid procedure

#: (hypothesis, x column, y column, unit, claimed direction of rho): unit "teacher" = pairs compared within
#: students, p-value over teacher relabellings ("teacher-level": x belongs to the teacher); "student" = students
CORRELATION_TESTS = (
    ("H2_teacher_performance", "teacher_accuracy", "improvement", "teacher-level", "two-sided"),
    ("H3_student_size", "student_size", "improvement", "student", "less"),
    ("H3_student_sft", "sft_accuracy_independent", "improvement", "student", "less"),
    ("H4_agreement", "error_consistency_stratified", "improvement", "teacher", "two-sided"),
    ("H5_fidelity", "bleu", "improvement", "teacher", "two-sided"),
)
#: H5 (rationale BLEU) is a math hypothesis in the paper
BLEU_DOMAINS = ("math",)
UNIT_NAMES = {"teacher": "teacher-student pairs (compared within students; the teachers are the units, "
                         "relabelled jointly)",
              "teacher-level": "teacher-student pairs (compared within students; the teachers are the units, "
                               "relabelled jointly)",
              "student": "students"}
#: why H3 against SFT accuracy needs an SFT accuracy measured apart from the gain
H3_SFT_NOT_TESTABLE = (
    "not testable: the student's one SFT run enters its SFT accuracy (+) and every gain (-), so its training "
    "deviation alone makes a negative slope; testable with the untuned base model's results (role base) or a "
    "second SFT seed per student that is not a KD baseline")


def _underpowered(row: dict) -> dict:
    if not row["note"] and not row["power"] >= ADEQUATE_POWER:
        row["note"] = (f"underpowered: {row['n']} {row['unit'].split(' ')[0]}, power {row['power']:.2f} "
                       f"for {row['effect_of_interest']}")
    return row


def _units(improvements: pd.DataFrame, columns: list[str], level: str) -> dict[tuple[str, str, str], pd.DataFrame]:
    """Mean of ``columns`` per unit (student, or (teacher, student) pair), for every (domain, method, task),
    method ``all`` pooling the methods; rows with a NaN in ``columns`` are left out."""
    keys = ["student"] if level == "student" else ["teacher", "student"]
    data = improvements.dropna(subset=columns)
    pooled = data.groupby(["domain", "task"] + keys)[columns].mean().reset_index().assign(method="all")
    each = data.groupby(["domain", "method", "task"] + keys)[columns].mean().reset_index()
    both = pd.concat([pooled, each], ignore_index=True)
    return {key: units for key, units in both.groupby(["domain", "method", "task"])}


def _correlation(units: pd.DataFrame, x: str, y: str, level: str, alternative: str, alpha: float,
                 n_resamples: int, seed: int) -> dict:
    from kd_utils.statistics.exact import teacher_permutation_spearman

    if level == "student":
        res = permutation_spearman(units[x], units[y], None, n_resamples, seed, alpha=alpha, alternative=alternative)
    else:
        res = teacher_permutation_spearman(units[x], units[y], units["teacher"], units["student"],
                                           teacher_level=level == "teacher-level", alternative=alternative,
                                           alpha=alpha, n_resamples=n_resamples, seed=seed)
    # a Fisher-z interval would not agree with the permutation p-value: none is reported
    return res | {"ci_low": math.nan, "ci_high": math.nan}


def study_hypothesis_tests(improvements: pd.DataFrame, agreement: str = "error_consistency_stratified",
                           alpha: float = ALPHA, n_resamples: int = N_RESAMPLES, seed: int = 0,
                           bleu_domains: Sequence[str] = BLEU_DOMAINS) -> pd.DataFrame:
    """H1-H5 by the valid procedure (module docstring), per domain, hypothesis, method and task.

    ``improvements`` is a mean-over-temperatures (or fixed-temperature) table, optionally
    with the split columns of :func:`~kd_utils.statistics.per_example.split_estimates`,
    ``sft_accuracy_independent`` (:func:`~kd_utils.statistics.improvements.independent_sft_accuracy`)
    and fidelity metrics; ``agreement`` names the H4 measure (default the error
    consistency beyond item difficulty: raw agreement, and even plain error consistency
    once items differ in difficulty, rise with accuracy alone).
    H1: exact sign-flip test over students (:func:`~kd_utils.statistics.exact.sign_flip_test`);
    methods: Friedman with students as blocks; H2, H4, H5: teachers as units
    (:func:`~kd_utils.statistics.exact.teacher_permutation_spearman`); H3: students,
    one-sided in the paper's direction (smaller and weaker students gain more).
    Columns: see ``STUDY_TEST_COLUMNS``; ``pvalue`` is the p-value Holm and the verdicts
    use, ``pvalue_holm`` adjusts it across the tasks of each (domain, hypothesis, method),
    ``min_pvalue`` is the smallest p the design allows, ``pvalue_selected`` is H1 on the
    selected-temperature split estimate. H5 is tested in ``bleu_domains`` only (the paper's: math).
    """
    from kd_utils.statistics.exact import sign_flip_test

    correlations = [(h, agreement if h == "H4_agreement" else x, y, level, alt)
                    for h, x, y, level, alt in CORRELATION_TESTS]
    empty = pd.DataFrame(columns=["teacher", "student", "improvement", "improvement_selected"])
    rows = []
    h1 = _units(improvements, ["improvement"], "student")
    selected = (_units(improvements, ["improvement_selected"], "student")
                if "improvement_selected" in improvements and improvements["improvement_selected"].notna().any()
                else {})
    correlation_units = {x: _units(improvements, [x, y], "student" if level == "student" else "pair")
                         for _, x, y, level, _ in correlations if x in improvements and y in improvements}
    for domain, dom in sort_rows(improvements, ["domain"]).groupby("domain", sort=False):
        tasks, methods = _domain_levels(dom)
        for method in ["all"] + methods:
            for task in tasks:
                res = sign_flip_test(h1.get((domain, method, task), empty)["improvement"], "greater", alpha,
                                     n_resamples, seed)
                chosen = selected.get((domain, method, task))
                rows.append(_underpowered(res | {
                    "domain": domain, "hypothesis": "H1_improvement_ttest", "method": method, "task": task,
                    "unit": UNIT_NAMES["student"], "alternative": "greater",
                    "test": "exact sign-flip test over students, one-sided (interval: the same test inverted, "
                            f"{1 - 2 * alpha:.0%})",
                    "power": unit_ttest(h1.get((domain, method, task), empty)["improvement"], "greater",
                                        alpha=alpha)["power"] if res["note"] == "" else 0.0,
                    "effect_of_interest": f"a {GAIN_OF_INTEREST:g}-point gain",
                    "pvalue_selected": math.nan if chosen is None else
                    sign_flip_test(chosen["improvement_selected"], "greater", alpha, n_resamples, seed)["pvalue"]}))
        # students as blocks: a student's pairs share its SFT run and its method-by-student effects
        blocks = dom.pivot_table(index=["task", "student"], columns="method", values="improvement", aggfunc="mean")
        for task in tasks:
            table = blocks.loc[task] if task in blocks.index.get_level_values(0) else pd.DataFrame()
            rows.append(_underpowered(friedman_test(table, alpha, n_resamples, seed) | {
                "domain": domain, "hypothesis": "H1_method_friedman", "method": "all", "task": task,
                "unit": "students (blocks; each the mean over its teachers)", "alternative": "two-sided",
                "test": "Friedman test, permutation p (estimate: Kendall's W)",
                "effect_of_interest": f"Cohen's medium f = {MEDIUM_EFFECT['anova']}"}))
        for hypothesis, x, y, level, alternative in correlations:
            if hypothesis == "H5_fidelity" and domain not in bleu_domains:
                continue
            missing = x not in dom or y not in dom or dom[x].isna().all() or dom[y].isna().all()
            if missing and hypothesis == "H3_student_sft" and y in dom:
                rows += [{"domain": domain, "hypothesis": hypothesis, "method": method, "task": task,
                          "n": 0, "note": H3_SFT_NOT_TESTABLE, "unit": UNIT_NAMES[level], "alternative": alternative,
                          "test": f"Spearman of {y} with an SFT accuracy measured apart from it"}
                         for method in ["all"] + methods for task in tasks]
                continue
            if missing:
                continue
            for method in ["all"] + methods:
                for task in tasks:
                    at = correlation_units[x].get((domain, method, task),
                                                  pd.DataFrame(columns=["teacher", "student", x, y]))
                    res = _correlation(at, x, y, level, alternative, alpha, n_resamples, seed)
                    rows.append(_underpowered(res | {
                        "domain": domain, "hypothesis": hypothesis, "method": method, "task": task,
                        "unit": UNIT_NAMES[level], "alternative": alternative,
                        "test": f"Spearman of {y} with {x}, permutation p"
                                + ("" if alternative == "two-sided" else f" (one-sided: rho {alternative} than 0)"),
                        "effect_of_interest": f"Cohen's medium rho = {MEDIUM_EFFECT['spearman']}"}))
    tests = pd.DataFrame(rows, columns=list(STUDY_TEST_COLUMNS))
    return holm_adjust(tests) if len(tests) else tests


def agreement_gain_tests(fidelity: pd.DataFrame, measure: str = "error_consistency", alpha: float = ALPHA
                         ) -> pd.DataFrame:
    """H4_kd_vs_sft: does KD raise the student's agreement with its teacher over SFT? Per domain and task.

    ``fidelity`` has one row per (run or pair, task) with a ``method`` column in which
    SFT rows compare the student's SFT model with the same teacher. Per (teacher,
    student, task): the mean ``measure`` of the KD rows minus the SFT row's; ``average``:
    the mean over the tasks that have both. The SFT model is shared by a student's
    pairs, so the unit is the student (mean over its teachers): a two-sided t-test,
    power for Cohen's medium d = 0.5. Columns as :func:`study_hypothesis_tests`.
    """
    data = fidelity.dropna(subset=[measure])
    if "noise_sigma" in data:
        data = data[data["noise_sigma"].fillna(0) == 0]
    keys = ["domain", "teacher", "student", "task"]
    kd = data[data["method"] != "sft"].groupby(keys)[measure].mean()
    sft = data[data["method"] == "sft"].groupby(keys)[measure].mean()
    gain = (kd - sft).dropna().rename("gain").reset_index()
    average = gain.groupby(["domain", "teacher", "student"])["gain"].mean().reset_index().assign(task="average")
    gain = pd.concat([gain, average], ignore_index=True)
    rows = []
    for (domain, task), part in sort_rows(gain, ["domain", "task"]).groupby(["domain", "task"], sort=False):
        units = part.groupby("student")["gain"].mean()
        res = unit_ttest(units, "two-sided", alpha=alpha)
        sd = float(units.std(ddof=1)) if len(units) > 1 else math.nan
        res["power"] = ttest_power(len(units), MEDIUM_EFFECT["ttest"] * sd, sd, alpha, "two-sided")
        rows.append(_underpowered(res | {
            "domain": domain, "hypothesis": "H4_kd_vs_sft", "method": "all", "task": task,
            "unit": UNIT_NAMES["student"], "test": f"two-sided t-test of KD minus SFT {measure}",
            "effect_of_interest": f"Cohen's medium d = {MEDIUM_EFFECT['ttest']}"}))
    tests = pd.DataFrame(rows, columns=list(STUDY_TEST_COLUMNS))
    return holm_adjust(tests) if len(tests) else tests
