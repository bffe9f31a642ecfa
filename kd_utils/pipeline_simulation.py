"""Whole-pipeline simulations: synthetic studies (:mod:`kd_utils.statistics.simulation`) put through the
analysis the notebook runs (:func:`kd_utils.analysis.study_analysis`).

:func:`simulate` analyses many studies of one :class:`~kd_utils.statistics.simulation.Design` and returns,
per test family (:data:`FAMILIES`), how often it rejected at alpha (or, for the bootstrap intervals, how
often an interval missed the true improvement). The earlier procedures (within-student permutations, pairs
as Friedman blocks, the split H3, plain error consistency) and the paper's as published are put through the
same studies (:data:`COMPARISONS`). This module sits above :mod:`kd_utils.analysis` and
:mod:`kd_utils.fidelity` in the import order: data flows from the simulated results.csv through the
analysis to the rates, as in a study.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from kd_utils import fidelity as fd
from kd_utils.analysis import study_analysis
from kd_utils.constants import ALPHA
from kd_utils.statistics.improvements import KEYS, improvement_table
from kd_utils.statistics.permutation_tests import friedman_test, permutation_spearman
from kd_utils.statistics.published_tests import hypothesis_tests
from kd_utils.statistics.simulation import Design, simulate_studies
from kd_utils.statistics.study_tests import unit_ttest


def _by_study(frame: pd.DataFrame, values: np.ndarray | pd.Series) -> pd.DataFrame:
    """Values with the study each came from (the ``#k`` of its domain)."""
    return pd.DataFrame({"study": frame["domain"].astype(str).str.rsplit("#", n=1).str[1].astype(int).to_numpy(),
                         "value": np.asarray(values, float)})


def _rejected(tests: pd.DataFrame, hypothesis: str, alpha: float, column: str = "pvalue") -> pd.DataFrame:
    rows = tests[(tests["hypothesis"] == hypothesis) & tests[column].notna()]
    return _by_study(rows, rows[column] < alpha)


#: family -> (what is counted, needs predictions); see :func:`study_outcomes`
FAMILIES = {
    "H1 sign-flip over students": ("p < alpha", False),
    "H1 sign-flip over students, average task, methods pooled": ("p < alpha", False),
    "H1 interval misses the true mean gain (average task, methods pooled)": ("miss", False),
    "H1 Friedman over students": ("p < alpha", False),
    "H2 Spearman, teachers relabelled": ("p < alpha", False),
    "H3 size over students (one-sided)": ("p < alpha", False),
    "H3 base-model accuracy over students (one-sided)": ("p < alpha", False),
    "H1 sign-flip, selected temperature (split)": ("p < alpha", True),
    "H4 stratified error consistency, teachers relabelled": ("p < alpha", True),
    "H4 KD vs SFT stratified error consistency": ("p < alpha", True),
    "H5 BLEU, teachers relabelled": ("p < alpha", True),
    "McNemar accuracy, per run and task": ("p < alpha", True),
    "McNemar agreement, per run and task": ("p < alpha", True),
    "bootstrap 95% interval misses the truth": ("miss", False),
    "primary family (Holm): any rejection in a domain": ("per domain", False),
    "verdict 'supported', any hypothesis of a domain": ("per domain", False),
    "before: H1 t-test over students": ("p < alpha", False),
    "before: H1 Friedman over pairs": ("p < alpha", False),
    "before: H2 permutation within students": ("p < alpha", False),
    "before: H3 SFT accuracy (split), over students": ("p < alpha", False),
    "before: H4 error consistency, within students": ("p < alpha", True),
    "before: H4 raw agreement, within students": ("p < alpha", True),
    "as published: H1 t-test over rows, best temperature": ("p < alpha", False),
    "as published: H1 ANOVA over rows": ("p < alpha", False),
    "as published: H2 Spearman over rows": ("p < alpha", False),
    "as published: H3 size, Spearman over rows": ("p < alpha", False),
    "as published: H3 SFT accuracy, Spearman over rows": ("p < alpha", False),
}
#: families that compare the procedure with what it replaced (expected to fail some scenarios)
COMPARISONS = ("before", "as published")


def _within_students(improvements: pd.DataFrame, x: str, n_permutations: int, seed: int, alpha: float
                     ) -> pd.DataFrame:
    """The earlier H2/H4 test: pairs permuted within students, per domain and task (methods pooled)."""
    rows = []
    data = improvements.dropna(subset=[x, "improvement"])
    for (domain, _), part in data.groupby(["domain", "task"]):
        units = part.groupby(["teacher", "student"])[[x, "improvement"]].mean().reset_index()
        p = permutation_spearman(units[x], units["improvement"], units["student"], n_permutations, seed,
                                 alpha=alpha)["pvalue"]
        if not math.isnan(p):
            rows.append({"domain": domain, "rejected": p < alpha})
    rows = pd.DataFrame(rows, columns=["domain", "rejected"])
    return _by_study(rows, rows["rejected"])


def _true_improvements(results: pd.DataFrame) -> pd.DataFrame:
    """Every improvement row's expected value (its KD runs' expected accuracy minus the SFT run's)."""
    truth = results[["expected_accuracy"]].rename(columns={"expected_accuracy": "accuracy"})
    table = improvement_table(results.assign(accuracy=truth["accuracy"]), temperature="mean")
    return table[KEYS + ["improvement"]].rename(columns={"improvement": "true_improvement"})


def not_under_the_null(design: Design) -> set[str]:
    """Families whose own null the scenario does not satisfy (left out of its type-I rates): runs that
    differ by training deviations or by effects really differ, so per-run McNemar tests find it; the
    temperature chosen on half A picks, among runs that differ by training deviations, one that is
    really better than its SFT run (the selected gain's expectation is above 0); and KD runs that copy
    their teacher really raise agreement over SFT."""
    out = set()
    run_effects = any((design.run_sd, design.teacher_effect_sd, design.student_effect_sd, design.method_student_sd))
    if run_effects or design.copy_max:
        out |= {"McNemar accuracy, per run and task", "McNemar agreement, per run and task"}
    if design.run_sd:
        out.add("H1 sign-flip, selected temperature (split)")
    if design.copy_max:
        out |= {"H4 KD vs SFT stratified error consistency", "verdict 'supported', any hypothesis of a domain"}
    return out


def study_outcomes(design: Design, rng: np.random.Generator, n_studies: int = 1, alpha: float = ALPHA,
                   n_bootstrap: int = 200, n_permutations: int = 999) -> list[dict[str, tuple[int, int]]]:
    """Simulate ``n_studies`` studies and analyse them (:func:`kd_utils.analysis.study_analysis`); per
    study and family (see FAMILIES) the (count, number of tests)."""
    results, store = simulate_studies(design, rng, n_studies)
    fidelity = None
    if store is not None:
        fidelity = fd.fidelity_table(results, store, bleu=False)
        teacher_bleu = {t: rng.normal(50.0, design.bleu_teacher_sd) for t in fidelity["teacher"].unique()}
        fidelity["bleu"] = fidelity["teacher"].map(teacher_bleu) + rng.normal(0.0, 10.0, len(fidelity))
    seed = int(rng.integers(2**31))
    math_domains = tuple(d for d in results["domain"].unique() if d.startswith("math#"))
    analysis = study_analysis(results, predictions=store, fidelity=fidelity, n_bootstrap=n_bootstrap,
                              n_permutations=n_permutations, seed=seed, mixed_model=False, bleu_domains=math_domains)
    tests, improvements = analysis.tests, analysis.improvements
    truth = design.gain  # the mean gain over students (the nulls' effects are centred)
    known = improvements[improvements["ci_low"].notna()].merge(_true_improvements(results), on=KEYS, how="left")
    covered = (known["ci_low"] <= known["true_improvement"]) & (known["true_improvement"] <= known["ci_high"])
    verdicts = analysis.verdicts
    primary = verdicts[verdicts["family"] == "primary"].assign(
        rejected=lambda v: v["pvalue_holm"] < alpha, supported=lambda v: v["verdict"] == "supported")
    any_primary = primary.groupby("domain", as_index=False)[["rejected"]].any()
    any_supported = verdicts.assign(supported=verdicts["verdict"] == "supported").groupby(
        "domain", as_index=False)["supported"].any()
    h1 = tests[(tests["hypothesis"] == "H1_improvement_ttest") & (tests["task"] == "average")
               & (tests["method"] == "all") & tests["ci_low"].notna()]
    counted = {
        "H1 sign-flip over students": _rejected(tests, "H1_improvement_ttest", alpha),
        "H1 sign-flip over students, average task, methods pooled":
            _rejected(tests[(tests["task"] == "average") & (tests["method"] == "all")], "H1_improvement_ttest", alpha),
        "H1 interval misses the true mean gain (average task, methods pooled)":
            _by_study(h1, ~((h1["ci_low"] <= truth) & (truth <= h1["ci_high"]))),
        "H1 Friedman over students": _rejected(tests, "H1_method_friedman", alpha),
        "H2 Spearman, teachers relabelled": _rejected(tests, "H2_teacher_performance", alpha),
        "H3 size over students (one-sided)": _rejected(tests, "H3_student_size", alpha),
        "H3 base-model accuracy over students (one-sided)": _rejected(tests, "H3_student_sft", alpha),
        "bootstrap 95% interval misses the truth": _by_study(known, ~covered),
        "primary family (Holm): any rejection in a domain": _by_study(any_primary, any_primary["rejected"]),
        "verdict 'supported', any hypothesis of a domain": _by_study(any_supported, any_supported["supported"]),
    }
    if store is not None:
        counted |= {
            "H1 sign-flip, selected temperature (split)": _rejected(tests, "H1_improvement_ttest", alpha,
                                                                    "pvalue_selected"),
            "H4 stratified error consistency, teachers relabelled": _rejected(tests, "H4_agreement", alpha),
            "H4 KD vs SFT stratified error consistency": _rejected(tests, "H4_kd_vs_sft", alpha),
            "H5 BLEU, teachers relabelled": _rejected(tests, "H5_fidelity", alpha),
            "McNemar accuracy, per run and task": _by_study(analysis.mcnemar, analysis.mcnemar["pvalue"] < alpha),
            "McNemar agreement, per run and task": _by_study(analysis.agreement_mcnemar,
                                                             analysis.agreement_mcnemar["pvalue"] < alpha),
            "before: H4 error consistency, within students":
                _within_students(improvements, "error_consistency", n_permutations, seed, alpha),
            "before: H4 raw agreement, within students":
                _within_students(improvements, "agreement", n_permutations, seed, alpha),
        }
    students = improvements.groupby(["domain", "task", "student"], as_index=False)["improvement"].mean()
    ttest = students.groupby(["domain", "task"], as_index=False)["improvement"].agg(
        lambda y: unit_ttest(y, "greater")["pvalue"]).dropna()
    pair_blocks = []
    for (domain, _), part in improvements.groupby(["domain", "task"]):
        p = friedman_test(part.pivot_table(index=["teacher", "student"], columns="method", values="improvement"),
                          alpha, n_permutations, seed)["pvalue"]
        if not math.isnan(p):
            pair_blocks.append({"domain": domain, "rejected": p < alpha})
    pair_blocks = pd.DataFrame(pair_blocks, columns=["domain", "rejected"])
    split = []
    if "sft_accuracy_a" in improvements:
        units = improvements.dropna(subset=["sft_accuracy_a", "improvement_b"]).groupby(
            ["domain", "task", "student"], as_index=False)[["sft_accuracy_a", "improvement_b"]].mean()
        for (domain, _), part in units.groupby(["domain", "task"]):
            p = permutation_spearman(part["sft_accuracy_a"], part["improvement_b"], None, n_permutations, seed,
                                     alpha=alpha)["pvalue"]
            if not math.isnan(p):
                split.append({"domain": domain, "rejected": p < alpha})
    split = pd.DataFrame(split, columns=["domain", "rejected"])
    counted |= {
        "before: H1 t-test over students": _by_study(ttest, ttest["improvement"] < alpha),
        "before: H1 Friedman over pairs": _by_study(pair_blocks, pair_blocks["rejected"]),
        "before: H2 permutation within students":
            _within_students(improvements, "teacher_accuracy", n_permutations, seed, alpha),
        "before: H3 SFT accuracy (split), over students": _by_study(split, split["rejected"]),
    }
    published = hypothesis_tests(improvement_table(results, temperature="best"), per_method=False)
    counted |= {
        "as published: H1 t-test over rows, best temperature": _rejected(published, "H1_improvement_ttest", alpha),
        "as published: H1 ANOVA over rows": _rejected(published, "H1_method_anova", alpha),
        "as published: H2 Spearman over rows": _rejected(published, "H2_teacher_performance", alpha),
        "as published: H3 size, Spearman over rows": _rejected(published, "H3_student_size", alpha),
        "as published: H3 SFT accuracy, Spearman over rows": _rejected(published, "H3_student_sft", alpha),
    }
    per_study = [{} for _ in range(n_studies)]
    null = design.gain == 0 and design.method_gain == 0 and design.teacher_slope == 0
    for family, frame in counted.items():
        if null and family in not_under_the_null(design):
            continue
        sums = frame.groupby("study")["value"].agg(["sum", "size"])
        for k in range(n_studies):
            per_study[k][family] = (int(sums["sum"].get(k, 0)), int(sums["size"].get(k, 0)))
    return per_study


def rates(per_study: list[dict[str, tuple[int, int]]]) -> pd.DataFrame:
    """Per family: tests, count, rate and its standard error with studies as clusters (tests of a study correlate)."""
    rows = []
    for family in FAMILIES:
        pairs = np.array([s[family] for s in per_study if family in s and s[family][1]], float).reshape(-1, 2)
        if not len(pairs):
            continue
        count, total = pairs.sum(axis=0)
        rate = count / total
        studies = len(pairs)
        se = (math.sqrt(studies / max(studies - 1, 1) * np.sum((pairs[:, 0] - rate * pairs[:, 1]) ** 2)) / total
              if studies > 1 else math.nan)
        rows.append({"family": family, "counted": FAMILIES[family][0], "studies": studies, "tests": int(total),
                     "count": int(count), "rate": rate, "se": se})
    return pd.DataFrame(rows)


def simulate(design: Design, n_studies: int, seed: int = 0, batch: int = 10,
             progress: Callable[[int], None] | None = None, **kwargs) -> pd.DataFrame:
    """:func:`study_outcomes` on ``n_studies`` independent studies, ``batch`` per analysis pass; the
    per-family :func:`rates`."""
    rng = np.random.default_rng(seed)
    per_study = []
    while len(per_study) < n_studies:
        size = min(batch, n_studies - len(per_study))
        per_study += study_outcomes(design, rng, size, **kwargs)
        if progress is not None:
            progress(len(per_study))
    return rates(per_study)
