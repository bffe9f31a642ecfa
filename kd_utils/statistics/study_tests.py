"""H1-H5 by the valid study-mode procedure, on the "mean"-temperature improvement table.

Tests count the units the design has. Every student has one SFT run (and one size) shared by all of its
teacher and method rows, and every teacher is shared by its students, so

- H1 (improvement > 0): exact one-sided sign-flip test over *students* (each the mean of
  its pairs and methods), its interval the same test inverted;
- H1 across methods: Friedman test with *students* as blocks (method effects vary by student);
- H2, H4, H5 (teacher accuracy, agreement beyond item difficulty, BLEU; per pair): aligned-rank
  Spearman within students, p-value from relabelling whole *teachers* jointly across students
  (:mod:`kd_utils.statistics.exact`), so a teacher effect on the gain cannot pass for a correlation;
- H3 (student size; student SFT accuracy): Spearman over *students*, one-sided in the paper's
  direction, exact permutation p-value; against SFT accuracy only when it is measured apart
  from the gain (:func:`~kd_utils.statistics.improvements.independent_sft_accuracy`);
- H4_kd_vs_sft (:func:`agreement_gain_tests`): KD's agreement with the teacher over SFT's, students as units.

A test with too few points, or on constant input, gets NaN statistic and p-value and a ``note`` starting
"not testable", and so does a test whose smallest attainable p-value exceeds alpha (with what would make it
testable); tests whose power for their effect of interest is below 0.8 are noted "underpowered".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.constants import ADEQUATE_POWER, ALPHA, N_RESAMPLES
from kd_utils.statistics.exact import sign_flip_test, teacher_permutation_spearman
from kd_utils.statistics.multiple_testing import holm_adjust
from kd_utils.statistics.permutation_tests import friedman_test, permutation_spearman
from kd_utils.statistics.power import GAIN_OF_INTEREST, MEDIUM_EFFECT, ttest_power
from kd_utils.statistics.published_tests import TEST_COLUMNS, domain_levels
from kd_utils.statistics.results import sort_rows
from kd_utils.statistics.tolerances import CONSTANT_VALUES

STUDY_TEST_COLUMNS = TEST_COLUMNS + (
    "pvalue_holm", "note", "power", "effect_of_interest", "estimate", "ci_low", "ci_high", "unit", "test",
    "pvalue_asymptotic", "pvalue_selected", "alternative", "min_pvalue")


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
    if np.allclose(y, y[0], rtol=0.0, atol=CONSTANT_VALUES):
        return out | {"note": "not testable: constant values (zero variance)"}
    sd = float(y.std(ddof=1))
    se = sd / math.sqrt(y.size)
    t = float(y.mean()) / se
    p = stats.t.sf(t, y.size - 1) if alternative == "greater" else 2 * stats.t.sf(abs(t), y.size - 1)
    half = stats.t.ppf(0.5 + level / 2, y.size - 1) * se
    power = ttest_power(y.size, effect, sd, alpha, "larger" if alternative == "greater" else "two-sided")
    return out | {"statistic": t, "pvalue": float(p), "ci_low": float(y.mean()) - half,
                  "ci_high": float(y.mean()) + half, "power": power}



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
        tasks, methods = domain_levels(dom)
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
