"""Exact tests whose units match the design: students for H1 and H3, teachers for H2, H4 and H5.

A KD study crosses few teachers with few students. Every student has one SFT run shared
by its pairs, and every teacher is shared by its students, so a teacher effect on the
gain repeats in every student's block. The tests here count those units:

- :func:`sign_flip_test`: H1 over students, exact (every sign pattern) for symmetric
  unit effects, with the interval obtained by inverting the same test;
- :func:`teacher_permutation_spearman`: H2, H4, H5; the aligned-rank Spearman of
  :func:`~kd_utils.statistics.permutation_tests.permutation_spearman` within students,
  its p-value from permuting the *teachers* jointly across all students (a teacher-level
  x such as teacher accuracy moves with its teacher; a pair-level x such as agreement is
  permuted only by teacher relabellings that map the design's pairs onto themselves);
- :func:`min_pvalue_note`: the smallest p a design can reach, and the design change that
  would make an untestable hypothesis testable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from kd_utils.constants import ALPHA, N_RESAMPLES
from kd_utils.statistics.permutation_tests import centered_ranks
from kd_utils.statistics.power import correlation_power
from kd_utils.statistics.tolerances import CONSTANT_VALUES, INPUT_SCALE_TIE, UNIT_SCALE_TIE

#: beyond this many units the sign-flip and teacher permutations are sampled instead of enumerated
MAX_EXACT = 4096


def _flips(n: int, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Sign patterns (rows) and whether they are all 2^n of them."""
    if 2**n <= max(MAX_EXACT, n_resamples):
        return 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1), True
    return rng.choice([-1.0, 1.0], size=(n_resamples, n)), False


def sign_flip_pvalue(values: np.ndarray, flips: np.ndarray, exact: bool, alternative: str) -> float:
    """p-value of the sum of ``values`` against its sign-flip distribution (identity included when exact)."""
    return tail_pvalue(float(values.sum()), flips @ values, alternative, exact,
                       tol=INPUT_SCALE_TIE * max(1.0, float(np.abs(values).sum())))


def tail_pvalue(observed: float, null: np.ndarray, alternative: str, exact: bool, tol: float) -> float:
    """Share of the null distribution at least as extreme as ``observed`` (``greater``, ``less`` or two-sided
    ``|.|``), within ``tol``: hits / draws when ``null`` enumerates every relabelling (identity included),
    else the Monte Carlo (hits + 1) / (draws + 1)."""
    if alternative == "greater":
        hits = np.sum(null >= observed - tol)
    elif alternative == "less":
        hits = np.sum(null <= observed + tol)
    else:
        hits = np.sum(np.abs(null) >= abs(observed) - tol)
    return float(hits / len(null)) if exact else float((hits + 1) / (len(null) + 1))


def students_needed(alpha: float, sided: int = 1) -> int:
    """The fewest students for which a sign-flip test can reach p <= alpha (``sided`` 1 or 2)."""
    return int(math.ceil(math.log2(sided / alpha)))


def sign_flip_test(values: Sequence[float], alternative: str = "greater", alpha: float = ALPHA,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Exact sign-flip test that the units' mean is 0 (H1 over students), with the test's own interval.

    Valid when each unit's value is symmetric about the true mean, whatever its spread
    (a unit may be a -55-point collapse). The p-value counts the sign patterns whose sum
    reaches the observed one (all 2^n when there are at most ``MAX_EXACT``). The interval
    is the set of means the same test does not reject: with ``alternative`` "greater" it is
    bounded by two one-sided tests at ``alpha`` (a 1 - 2 alpha interval), so ``ci_low`` > 0
    exactly when p < alpha. Too few units for p <= alpha: "not testable" with how many would do.
    Returns statistic (the mean), pvalue, n, estimate, ci_low, ci_high, min_pvalue, note.
    """
    y = np.asarray(values, float)
    y = y[~np.isnan(y)]
    n = int(y.size)
    sided = 1 if alternative in ("greater", "less") else 2
    min_p = min(1.0, sided / 2**n) if n else math.nan
    out = {"statistic": math.nan, "pvalue": math.nan, "n": n, "estimate": float(y.mean()) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "min_pvalue": min_p, "note": ""}
    if not n or min_p > alpha:
        return out | {"note": f"not testable: {n} student(s) allow a smallest p of {min_p:.3g} > {alpha}; "
                              f"needs {students_needed(alpha, sided)} students"}
    if np.allclose(y, y[0], rtol=0.0, atol=CONSTANT_VALUES):
        return out | {"note": "not testable: constant values (zero variance)"}
    flips, exact = _flips(n, n_resamples, np.random.default_rng(seed))
    p = sign_flip_pvalue(y, flips, exact, alternative)
    # the interval: means mu not rejected by the one-sided tests of y - mu at alpha / (3 - sided) each
    tail = alpha if sided == 1 else alpha / 2

    def bound(side: str) -> float:
        lo, hi = float(y.min()), float(y.max())  # p(mu) is monotone in mu; at the extremes one tail rejects
        for _ in range(60):
            mid = (lo + hi) / 2
            rejected = sign_flip_pvalue(y - mid, flips, exact, side) <= tail
            if side == "greater":
                lo, hi = (mid, hi) if rejected else (lo, mid)
            else:
                lo, hi = (lo, mid) if rejected else (mid, hi)
        return (lo + hi) / 2

    return out | {"statistic": float(y.mean()), "pvalue": p, "ci_low": bound("greater"), "ci_high": bound("less")}


def _teacher_groups(teachers: np.ndarray, students: np.ndarray, teacher_level: bool, n_resamples: int,
                    rng: np.random.Generator) -> tuple[list[np.ndarray], bool, int]:
    """Permutations of the pairs induced by permuting teachers: (index arrays, exact?, group size).

    A pair-level x can only move to a pair that exists, so only teacher relabellings that
    map the set of pairs onto itself are used (a group: the p-value stays exact)."""
    names = sorted(set(teachers))
    index = {(t, s): i for i, (t, s) in enumerate(zip(teachers, students))}
    slots = np.array([names.index(t) for t in teachers])

    def induced(perm: Sequence[int]) -> np.ndarray | None:
        if teacher_level:
            return np.asarray(perm)[slots]  # teacher slot each pair reads its x from
        target = [index.get((names[perm[names.index(t)]], s)) for t, s in zip(teachers, students)]
        return None if any(i is None for i in target) else np.array(target)

    if math.factorial(len(names)) <= max(MAX_EXACT, n_resamples):
        group = [g for g in (induced(p) for p in itertools.permutations(range(len(names)))) if g is not None]
        return group, True, len(group)
    group = []  # the identity is counted by (hits + 1) / (B + 1)
    tries = 0
    while len(group) < n_resamples + 1 and tries < 50 * n_resamples:
        tries += 1
        g = induced(list(rng.permutation(len(names))))
        if g is not None:
            group.append(g)
    return group, False, len(group)


def teacher_permutation_spearman(x: Sequence[float], y: Sequence[float], teachers: Sequence[str],
                                 students: Sequence[str], teacher_level: bool = False,
                                 alternative: str = "two-sided", alpha: float = ALPHA, n_resamples: int = N_RESAMPLES,
                                 seed: int = 0) -> dict:
    """Aligned-rank Spearman of pair-level ``y`` with ``x`` within students, p-value over teacher relabellings.

    Under the null the teachers' effects on x are unrelated to their effects on y; any
    effect a teacher has on the gain repeats in every one of its students and is kept
    together by relabelling whole teachers, so it cannot pass for a correlation.
    ``teacher_level``: x is a property of the teacher (its accuracy), moved with it to any
    teacher; else x is a pair's measurement (agreement, BLEU) and only relabellings that
    keep every pair inside the design are used. Students with one pair carry no
    within-student information and are left out, and so are teachers only they had.
    A design whose relabellings cannot reach p <= alpha is "not testable".
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    teachers, students = np.asarray(teachers, str), np.asarray(students, str)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y, teachers, students = x[keep], y[keep], teachers[keep], students[keep]
    names, sizes = np.unique(students, return_counts=True)
    multi = np.isin(students, names[sizes >= 2])
    x, y, teachers, students = x[multi], y[multi], teachers[multi], students[multi]
    n, n_teachers = int(x.size), len(set(teachers))
    out = {"statistic": math.nan, "pvalue": math.nan, "n": n, "estimate": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "power": correlation_power(n_teachers, alpha=alpha), "min_pvalue": math.nan,
           "note": "", "pvalue_asymptotic": math.nan}
    if n < 3 or n_teachers < 2:
        return out | {"power": 0.0, "note": f"not testable: {n} pair(s) of {n_teachers} teacher(s) in students with "
                                            f"2 or more teachers; needs 3 or more teachers shared by students"}
    rng = np.random.default_rng(seed)
    if teacher_level:
        # x is one value per teacher: each pair reads the value of the teacher its slot is relabelled to
        tnames = sorted(set(teachers))
        per_teacher = np.array([x[teachers == t][0] for t in tnames])
    group, exact, size = _teacher_groups(teachers, students, teacher_level, n_resamples, rng)
    min_p = 1.0 / size if exact else 1.0 / (n_resamples + 1)
    out["min_pvalue"] = min_p
    if exact and min_p > alpha:
        needed = permutations_needed(alpha, sided=1)
        return out | {"power": 0.0, "note": (
            f"not testable: {n_teachers} teachers allow {size} teacher relabelling(s), smallest p {min_p:.3g} > "
            f"{alpha}; the teachers are the units: needs {needed} or more teachers, each shared by students "
            f"(a crossed design)")}
    ry = centered_ranks(y, students)

    def rho_of(xv: np.ndarray) -> float:
        rx = centered_ranks(xv, students)
        denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
        return float(rx @ ry) / denom if denom > 0 else math.nan

    rho = rho_of(x)
    if math.isnan(rho):
        return out | {"note": "not testable: constant input within every student, rho undefined"}
    permuted = np.array([rho_of(per_teacher[g] if teacher_level else x[g]) for g in group])
    p = tail_pvalue(rho, np.nan_to_num(permuted), alternative, exact, tol=UNIT_SCALE_TIE)
    return out | {"statistic": rho, "pvalue": p, "estimate": rho}


def permutations_needed(alpha: float, sided: int = 1) -> int:
    """The fewest units whose n! permutations can reach p <= alpha (``sided`` 2: two tied extremes)."""
    return next(k for k in range(2, 20) if sided / math.factorial(k) <= alpha)
