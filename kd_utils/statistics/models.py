"""Mixed-effects model of the improvements with the design's grouping.

Per domain, on the (teacher, student, method, task) rows:

    improvement ~ C(task) + C(method) [+ log(student size)]
    random: an intercept per student, and within each student a variance component per
    pair (its teachers) and per task (the student's one SFT run on that task is shared
    by all of its pairs and methods)

statsmodels MixedLM, REML. Size varies only between students, so its slope has as many
independent units as there are students: it enters only with at least ``MIN_STUDENTS_FOR_SIZE``.

The model is descriptive: it reports coefficients and their model-based standard errors,
no p-values and no intervals. With 3-6 students and no method-by-student slopes or
teacher term, statsmodels' Wald z treats the pairs' rows as far more independent than
they are (on the paper's data, method contrasts at p = 1e-14 to 1e-22, a size slope at
0.005 against an exact 0.044 over the same students); the tests that count the design's
units are :func:`~kd_utils.statistics.hypothesis_tests.study_hypothesis_tests`.
A design with too few levels is refused with a note, and a fit that did not converge
(or has no finite fixed-effect standard errors) is reported as such, without coefficients.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from kd_utils.statistics.results import KD_METHODS, sort_rows

MIN_STUDENTS, MIN_PAIRS, MIN_STUDENTS_FOR_SIZE = 3, 4, 5
MIXED_COLUMNS = ["domain", "term", "coef", "se", "z", "pvalue", "ci_low", "ci_high", "n", "n_students", "n_pairs",
                 "n_tasks", "note"]


def _refused(domain: str, counts: dict, note: str) -> list[dict]:
    return [{"domain": domain, "term": "model", **counts, "note": note}]


def fit_mixed_model(data: pd.DataFrame, domain: str = "") -> list[dict]:
    """Fit the model (module docstring) to one domain's task rows; returns result rows (see MIXED_COLUMNS)."""
    import statsmodels.formula.api as smf

    data = data.dropna(subset=["improvement"]).assign(pair=lambda d: d["teacher"] + " -> " + d["student"])
    counts = {"n": len(data), "n_students": data["student"].nunique(), "n_pairs": data["pair"].nunique(),
              "n_tasks": data["task"].nunique()}
    if counts["n_students"] < MIN_STUDENTS or counts["n_pairs"] < MIN_PAIRS:
        return _refused(domain, counts, f"not testable: {counts['n_students']} student(s), {counts['n_pairs']} "
                                        f"pair(s); the model needs {MIN_STUDENTS} and {MIN_PAIRS}")
    terms, notes = [], []
    if counts["n_tasks"] >= 2:
        terms.append("C(task)")
    methods = [m for m in KD_METHODS if m in set(data["method"])]
    if len(methods) >= 2:
        terms.append(f"C(method, Treatment({methods[0]!r}))")
    sizes = data.groupby("student")["student_size"].first()
    if sizes.notna().all() and sizes.nunique() >= MIN_STUDENTS_FOR_SIZE:
        data = data.assign(log_size=np.log(data["student_size"]))
        terms.append("log_size")
    else:
        notes.append(f"log(size) omitted: {sizes.nunique()} student size(s), a student-level slope needs "
                     f"{MIN_STUDENTS_FOR_SIZE}")
    vc = {}
    if (data.groupby("student")["pair"].nunique() >= 2).any():
        vc["pair"] = "0 + C(pair)"
    if counts["n_tasks"] >= 2:
        vc["task"] = "0 + C(task)"
    formula = "improvement ~ " + (" + ".join(terms) if terms else "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm(formula, data, groups="student", re_formula="1", vc_formula=vc or None).fit(
                reml=True, method=["powell", "lbfgs"])  # derivative-free first: variances often sit at 0
        except (np.linalg.LinAlgError, ValueError) as err:
            return _refused(domain, counts, f"not testable: fit failed ({err})")
    messages = {str(w.message).splitlines()[0] for w in caught}
    fixed_se = np.asarray(fit.bse_fe, float)
    if not fit.converged or not (np.all(np.isfinite(fixed_se)) and np.all(fixed_se > 0)):
        why = "the optimizer did not converge" if not fit.converged else "fixed-effect standard errors not finite"
        return _refused(domain, counts, f"NOT converged: {why}; no coefficients reported")
    # statsmodels retries another optimizer when one fails: only the final fit counts
    status = "converged" + (" (after retrying another optimizer)" if any("Retrying" in m for m in messages) else "")
    if any("boundary" in m or "Hessian" in m for m in messages):
        notes.append("a variance component is at the boundary (about 0): the fixed effects' standard errors "
                     "then ignore that source of variation")
    note = "; ".join([status] + notes + ["descriptive: no p-values or intervals (too few students for Wald z)"])
    rows = []
    for term in fit.fe_params.index:
        if term == "Intercept" or term.startswith("C(task)"):
            continue
        label = re.sub(r"C\(method, Treatment\('(\w+)'\)\)\[T\.(\w+)\]", r"method[\2 vs \1]", term)
        rows.append({"domain": domain, "term": label.replace("log_size", "log(student_size_B)"),
                     "coef": fit.fe_params[term], "se": fit.bse_fe[term], **counts, "note": note})
    variances = {"student": float(fit.cov_re.iloc[0, 0]), **dict(zip(fit.model.exog_vc.names, fit.vcomp)),
                 "residual": float(fit.scale)}
    names = {"student": "student (random intercept)", "pair": "pair within student",
             "task": "task within student (the shared SFT run)", "residual": "residual"}
    for name, value in variances.items():
        rows.append({"domain": domain, "term": f"variance: {names[name]}", "coef": value, **counts, "note": note})
    return rows


def mixed_effects(improvements: pd.DataFrame) -> pd.DataFrame:
    """The mixed model (module docstring) per domain on the task rows (``average`` excluded)."""
    rows = []
    for domain, dom in sort_rows(improvements, ["domain"]).groupby("domain", sort=False):
        rows += fit_mixed_model(dom[dom["task"] != "average"], domain)
    out = pd.DataFrame(rows, columns=MIXED_COLUMNS)
    for column in ("coef", "se", "z", "pvalue", "ci_low", "ci_high"):
        out[column] = out[column].astype(float)
    return out if len(out) else out.assign(note=pd.Series(dtype=str))
