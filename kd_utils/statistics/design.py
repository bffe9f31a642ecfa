"""What a study's design can test, said before any result: per domain and hypothesis, its units,
the smallest p-value the design allows, and the change that would make an untestable one testable.

A hypothesis whose smallest attainable p exceeds alpha cannot be supported whatever the
data: with 3 students the sign-flip test of H1 bottoms out at 1/8, with 3 teachers shared
by students the teacher relabellings of H2/H4/H5 at 1/6. The study-design panel and the
study's dry run show this table, so a design is fixed before the runs are paid for.

:func:`study_design` says what a study's results can resolve once they are in: per domain its students,
pairs and examples per task, the H1 power for a medium effect and what sampling alone does at that n (the
report's banner and study_design.csv).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kd_utils.constants import ADEQUATE_POWER, ALPHA, N_RESAMPLES
from kd_utils.statistics.exact import _teacher_groups, permutations_needed, students_needed
from kd_utils.statistics.power import medium_effect_power
from kd_utils.tasks import tasks_for

DESIGN_COLUMNS = ["domain", "hypothesis", "units", "min_pvalue", "testable", "needs"]


def _shared_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairs of students with two or more teachers (the only ones a within-student comparison uses)."""
    counts = pairs.groupby("student")["teacher"].transform("nunique")
    return pairs[counts >= 2]


def design_testability(pairs: pd.DataFrame, n_methods: int, independent_sft: bool = False, alpha: float = ALPHA
                       ) -> pd.DataFrame:
    """Per hypothesis of one domain: units, smallest attainable p, testable at ``alpha``, what would make it so.

    ``pairs``: the (teacher, student) pairs with KD runs; ``n_methods``: KD methods per
    pair; ``independent_sft``: whether an SFT accuracy measured apart from the gains (base
    model or spare SFT seed) exists.
    """
    pairs = pairs[["teacher", "student"]].drop_duplicates()
    n_students = pairs["student"].nunique()
    shared = _shared_pairs(pairs)
    n_shared = shared["teacher"].nunique()
    rows = []

    def add(hypothesis: str, units: str, min_p: float, needs: str) -> None:
        ok = bool(min_p <= alpha)
        rows.append({"hypothesis": hypothesis, "units": units, "min_pvalue": min_p, "testable": ok,
                     "needs": "" if ok else needs})

    add("H1_improvement_ttest", f"{n_students} students", 1 / 2**n_students if n_students else 1.0,
        f"{students_needed(alpha)} or more students")
    friedman = 1.0 / math.factorial(n_methods) ** (n_students - 1) if n_methods >= 2 and n_students >= 3 else 1.0
    add("H1_method_friedman", f"{n_students} students x {n_methods} methods", friedman,
        "3 or more students and 2 or more methods")
    teacher_p = 1.0 / math.factorial(n_shared) if n_shared >= 2 else 1.0
    add("H2_teacher_performance", f"{n_shared} teachers shared by students", teacher_p,
        f"{permutations_needed(alpha)} or more teachers, each distilled into 2 or more of the students")
    add("H3_student_size", f"{n_students} students", 1.0 / math.factorial(n_students) if n_students else 1.0,
        f"{permutations_needed(alpha)} or more students of different sizes")
    if independent_sft:
        add("H3_student_sft", f"{n_students} students", 1.0 / math.factorial(n_students) if n_students else 1.0,
            f"{permutations_needed(alpha)} or more students")
    else:
        add("H3_student_sft", f"{n_students} students", 1.0,
            "the untuned base model's results (role base) or a second SFT seed per student, and "
            f"{permutations_needed(alpha)} or more students")
    if len(shared) >= 3 and n_shared >= 2:
        group = _teacher_groups(shared["teacher"].to_numpy(str), shared["student"].to_numpy(str), False, N_RESAMPLES,
                                np.random.default_rng(0))[2]
        pair_p = 1.0 / group
    else:
        pair_p = 1.0
    for hypothesis in ("H4_agreement", "H5_fidelity"):
        add(hypothesis, f"{n_shared} teachers shared by students", pair_p,
            f"{permutations_needed(alpha)} or more teachers crossed with the students (every teacher with "
            "every student)")
    return pd.DataFrame(rows)


def study_testability(improvements: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """:func:`design_testability` for every domain of an improvement table (columns: ``DESIGN_COLUMNS``)."""
    frames = []
    for domain, dom in improvements.groupby("domain", sort=False):
        independent = "sft_accuracy_independent" in dom and bool(dom["sft_accuracy_independent"].notna().any())
        frames.append(design_testability(dom, dom["method"].nunique(), independent, alpha).assign(domain=domain))
    return pd.concat(frames, ignore_index=True)[DESIGN_COLUMNS] if frames else pd.DataFrame(columns=DESIGN_COLUMNS)


def _sampling_scale(n: float) -> dict:
    """At n examples and accuracy 50%, in percentage points: the 95% Wilson half-width of one accuracy, two
    standard deviations of a difference of two independent accuracies, and the difference a two-sided 5%
    test detects with 80% power."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    if not n >= 1:
        return {"ci_half_width_pp": math.nan, "difference_2sd_pp": math.nan, "detectable_difference_pp": math.nan}
    low, high = proportion_confint(n / 2, n, method="wilson")
    sd = 100 * math.sqrt(0.5 / n)
    return {"ci_half_width_pp": 100 * (high - low) / 2, "difference_2sd_pp": 2 * sd,
            "detectable_difference_pp": (norm.ppf(0.975) + norm.ppf(ADEQUATE_POWER)) * sd}


def study_design(results: pd.DataFrame, improvements: pd.DataFrame) -> pd.DataFrame:
    """Per domain, the numbers the banner is made of (the notebook writes them to study_design.csv):
    students with an improvement (KD and SFT runs), teacher-student pairs, the median n per task of the
    student runs, the power of the H1 t-test over the students (its units) to detect a medium effect (d = 0.5), what
    sampling alone does at that n (:func:`_sampling_scale`), how many student accuracies are 0, and which of the
    paper's tasks of the domain no student was evaluated on (``paper_tasks_missing``: the domain average lacks them)."""
    students = results[(results["role"] == "student") & (results["task"] != "average")]
    rows = []
    for domain, runs in students.groupby("domain", sort=False):
        compared = improvements.loc[improvements["domain"] == domain, ["teacher", "student"]].drop_duplicates()
        pairs, students = len(compared), compared["student"].nunique()
        n = runs["n"].median() if "n" in runs and runs["n"].notna().any() else math.nan
        rows.append({"domain": domain, "students": students, "pairs": pairs, "n_per_task": n,
                     "h1_power_medium_effect": medium_effect_power("ttest", students) if students >= 2 else 0.0,
                     **_sampling_scale(n), "student_accuracies": len(runs),
                     "zero_accuracies": int((runs["accuracy"] == 0).sum()), "tasks": runs["task"].nunique(),
                     "paper_tasks_missing": ", ".join(t.id for t in tasks_for(domain)
                                                      if t.id not in set(runs["task"]))})
    return pd.DataFrame(rows)
