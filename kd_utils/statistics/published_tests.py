"""H1-H5 as the paper computed them (the procedure as published), on the "best"-temperature improvement table.

Every (teacher, student, method) row is a point: scipy's one-sample t-test, one-way ANOVA and Spearman. This
reproduces the paper's statistics; its temperature was chosen on the test set and its rows are not
independent, so it is not a valid basis for inference (the valid procedure: :mod:`~kd_utils.statistics.study_tests`).
A test with too few points, or on constant input, gets NaN statistic and p-value and a ``note`` starting
"not testable"; tests whose power for a medium effect is below 0.8 are noted "underpowered".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.constants import ADEQUATE_POWER
from kd_utils.statistics.power import MEDIUM_EFFECT, medium_effect_power
from kd_utils.statistics.results import sort_rows

TEST_COLUMNS = ("domain", "hypothesis", "method", "task", "statistic", "pvalue", "n")
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


def _published_test(kind: str, data: pd.DataFrame, x: str | None, min_points: int
                    ) -> tuple[float, float, int, str, float]:
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


def domain_levels(dom: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The tasks and the methods of a domain's rows, in the order tables show them."""
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
        tasks, methods = domain_levels(dom)
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
