"""What a study's design can test, said before any result: per domain and hypothesis, its units,
the smallest p-value the design allows, and the change that would make an untestable one testable.

A hypothesis whose smallest attainable p exceeds alpha cannot be supported whatever the
data: with 3 students the sign-flip test of H1 bottoms out at 1/8, with 3 teachers shared
by students the teacher relabellings of H2/H4/H5 at 1/6. The study-design panel and the
study's dry run show this table, so a design is fixed before the runs are paid for.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kd_utils.constants import ALPHA, N_RESAMPLES
from kd_utils.statistics.exact import _teacher_groups, permutations_needed, students_needed

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
