"""Whole-pipeline simulations: synthetic studies put through the analysis the notebook runs.

:func:`simulate_study` draws one study of the issue's design: per domain 3 teachers x 3
students (9 pairs), fkl / rkl / gkd at 3 temperatures sharing one SFT run per student,
13 tasks (6 math, 7 commonsense) of ``n_examples`` = 300 examples. Every run's outcome on
an example is Bernoulli(p): p[student, task] for the SFT run and, under the null, for
every KD run of that student too (no method and no temperature helps); ``gain``
percentage points are added to every KD run's p for power, ``method_gain`` to the first
method's only. With predictions, answers are drawn too (a wrong answer is one of the
task's other options, or a nearby wrong number), students independently of their
teacher, so every agreement measure is under its null as well; rationale BLEU, which
costs ~40 ms per run and task through sacrebleu, is drawn independently instead.

:func:`simulate` runs :func:`kd_utils.analysis.study_analysis` on many such studies and
returns, per test family, how often it rejected at alpha (or, for the bootstrap
intervals, how often an interval missed the true improvement). The paper's procedure
as published is put through the same studies for comparison.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils.predictions import Predictions
from kd_utils.statistics.hypothesis_tests import hypothesis_tests, permutation_spearman, unit_ttest
from kd_utils.statistics.improvements import improvement_table
from kd_utils.statistics.results import RESULTS_COLUMNS, validate_results

SIM_TASKS = {
    "math": ("gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua"),
    "commonsense": ("boolq", "piqa", "siqa", "winogrande", "arc_e", "arc_c", "obqa"),
}
#: answer options of the multiple-choice tasks (the others are numeric)
CHOICES = {"aqua": 5, "boolq": 2, "piqa": 2, "siqa": 3, "winogrande": 2, "arc_e": 4, "arc_c": 4, "obqa": 4}
TEACHER_SIZES = (3.0, 7.0, 14.0)
STUDENT_SIZES = (0.5, 1.5, 3.0)


@dataclass(frozen=True)
class Design:
    """One simulated study design (the defaults are the issue's)."""

    n_examples: int = 300
    n_teachers: int = 3
    n_students: int = 3
    methods: tuple[str, ...] = ("fkl", "rkl", "gkd")
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0)
    gain: float = 0.0  # percentage points added to every KD run's success probability
    method_gain: float = 0.0  # percentage points added to the first method's runs only
    predictions: bool = True
    tasks: tuple[tuple[str, str], ...] = tuple((t, d) for d, names in SIM_TASKS.items() for t in names)


def _runs(design: Design) -> list[dict]:
    teachers = [f"T-{s:g}B" for s in TEACHER_SIZES[: design.n_teachers]]
    students = [f"S-{s:g}B" for s in STUDENT_SIZES[: design.n_students]]
    runs = [dict(run_id=t, role="teacher", model=t, teacher="", method="sft", temperature=math.nan, who=("t", i),
                 gain=0.0) for i, t in enumerate(teachers)]
    for j, s in enumerate(students):
        runs.append(dict(run_id=f"{s}-sft", role="student", model=s, teacher="", method="sft", temperature=math.nan,
                         who=("s", j), gain=0.0))
        for t in teachers:
            for m, method in enumerate(design.methods):
                for temp in design.temperatures:
                    runs.append(dict(run_id=f"{s}-{method}-{t}-t{temp:g}", role="student", model=s, teacher=t,
                                     method=method, temperature=temp, who=("s", j),
                                     gain=design.gain + (design.method_gain if m == 0 else 0.0)))
    return runs


def simulate_study(design: Design, rng: np.random.Generator) -> tuple[pd.DataFrame, Predictions | None]:
    """One synthetic study: its results table and (with ``design.predictions``) its predictions in memory."""
    tasks = list(design.tasks)
    n = design.n_examples
    p_student = rng.uniform(0.25, 0.75, (design.n_students, len(tasks)))
    p_teacher = rng.uniform(0.55, 0.9, (design.n_teachers, len(tasks)))
    runs = _runs(design)
    p = np.array([(p_teacher if r["who"][0] == "t" else p_student)[r["who"][1]] + r["gain"] / 100 for r in runs])
    p = np.clip(p, 0.0, 1.0)
    store = None
    if design.predictions:
        outcomes = rng.random((len(runs), len(tasks), n)) < p[:, :, None]
        correct = outcomes.sum(axis=2)
        tables = {}
        for k, (task, _) in enumerate(tasks):
            ids = np.array([f"{task}-{i}" for i in range(n)])
            options = CHOICES.get(task)
            answer = rng.integers(options, size=n).astype(float) if options else np.arange(n, dtype=float)
            for r, run in enumerate(runs):
                wrong = ((answer + rng.integers(1, options, size=n)) % options if options
                         else answer + rng.integers(1, 50, size=n))
                tables[(run["run_id"], task)] = pd.DataFrame(
                    {"id": ids, "prediction": np.where(outcomes[r, k], answer, wrong), "correct": outcomes[r, k],
                     "output": ""})
        store = Predictions(tables=tables)
    else:
        correct = rng.binomial(n, p)
    rows = [{"study": "simulated", "run_id": run["run_id"], "role": run["role"], "model": run["model"],
             "teacher": run["teacher"], "method": run["method"], "temperature": run["temperature"],
             "noise_sigma": 0.0, "seed": 0.0, "task": task, "domain": domain, "n": float(n),
             "correct": float(correct[r, k]), "accuracy": 100.0 * correct[r, k] / n,
             "ci_low": math.nan, "ci_high": math.nan}
            for r, run in enumerate(runs) for k, (task, domain) in enumerate(tasks)]
    return validate_results(pd.DataFrame(rows, columns=list(RESULTS_COLUMNS)), "simulated study"), store


def simulate_studies(design: Design, rng: np.random.Generator, n_studies: int
                     ) -> tuple[pd.DataFrame, Predictions | None]:
    """``n_studies`` independent studies in one results table: study k's domains are ``<domain>#k``
    and its models ``<model>#k``, so that one pass of the analysis (which works per domain) analyses
    every study on its own while pandas' per-call costs are paid once."""
    frames, tables = [], {}
    for k in range(n_studies):
        results, store = simulate_study(design, rng)
        suffix = f"#{k}"
        frames.append(results.assign(
            domain=results["domain"] + suffix, model=results["model"] + suffix, run_id=f"{k}:" + results["run_id"],
            teacher=results["teacher"].where(results["teacher"] == "", results["teacher"] + suffix)))
        if store is not None:
            tables |= {(f"{k}:{run_id}", task): frame for (run_id, task), frame in store._tables.items()}
    return pd.concat(frames, ignore_index=True), Predictions(tables=tables) if design.predictions else None


def _by_study(frame: pd.DataFrame, values: np.ndarray | pd.Series) -> pd.DataFrame:
    """Values with the study each came from (the ``#k`` of its domain)."""
    return pd.DataFrame({"study": frame["domain"].astype(str).str.rsplit("#", n=1).str[1].astype(int).to_numpy(),
                         "value": np.asarray(values, float)})


def _rejected(tests: pd.DataFrame, hypothesis: str, alpha: float, column: str = "pvalue") -> pd.DataFrame:
    rows = tests[(tests["hypothesis"] == hypothesis) & tests[column].notna()]
    return _by_study(rows, rows[column] < alpha)


#: family -> (what is counted, needs predictions); see :func:`study_outcomes`
FAMILIES = {
    "H1 t-test over students": ("p < alpha", False),
    "H1 t-test over students, average task, methods pooled": ("p < alpha", False),
    "H1 t-test, selected temperature (split)": ("p < alpha", True),
    "H1 Friedman over pairs": ("p < alpha", False),
    "H2 Spearman within students": ("p < alpha", False),
    "H3 size, Spearman over students": ("p < alpha", False),
    "H3 SFT accuracy (split), over students": ("p < alpha", False),
    "H4 error consistency, within students": ("p < alpha", True),
    "H4 KD vs SFT error consistency": ("p < alpha", True),
    "H5 BLEU, within students": ("p < alpha", True),
    "McNemar accuracy, per run and task": ("p < alpha", True),
    "McNemar agreement, per run and task": ("p < alpha", True),
    "bootstrap 95% interval misses the truth": ("miss", False),
    "bootstrap 95% interval excludes 0": ("0 outside", False),
    "mixed model, method contrasts": ("p < alpha", False),
    "verdict 'supported', any hypothesis of a domain": ("per domain", False),
    "as published: H1 t-test over rows, best temperature": ("p < alpha", False),
    "as published: H1 ANOVA over rows": ("p < alpha", False),
    "as published: H2 Spearman over rows": ("p < alpha", False),
    "as published: H3 size, Spearman over rows": ("p < alpha", False),
    "as published: H3 SFT accuracy, Spearman over rows": ("p < alpha", False),
    "naive: H4 raw agreement, within students": ("p < alpha", True),
    "naive: H1 t-test over pairs, mean temperature": ("p < alpha", False),
}


def study_outcomes(design: Design, rng: np.random.Generator, n_studies: int = 1, alpha: float = 0.05,
                   n_bootstrap: int = 200, n_permutations: int = 999, mixed_studies: int | None = None
                   ) -> list[dict[str, tuple[int, int]]]:
    """Simulate ``n_studies`` studies and analyse them (:func:`kd_utils.analysis.study_analysis`); per
    study and family (see FAMILIES) the (count, number of tests). The mixed model, the slowest part,
    is fitted for the first ``mixed_studies`` studies only (default all)."""
    from kd_utils import fidelity as fd
    from kd_utils.analysis import study_analysis
    from kd_utils.statistics.models import mixed_effects

    results, store = simulate_studies(design, rng, n_studies)
    fidelity = None
    if store is not None:
        fidelity = fd.fidelity_table(results, store, bleu=False)
        fidelity["bleu"] = rng.normal(50.0, 10.0, len(fidelity))
    seed = int(rng.integers(2**31))
    math_domains = tuple(d for d in results["domain"].unique() if d.startswith("math#"))
    analysis = study_analysis(results, predictions=store, fidelity=fidelity, n_bootstrap=n_bootstrap,
                              n_permutations=n_permutations, seed=seed, mixed_model=False, bleu_domains=math_domains)
    tests, improvements = analysis.tests, analysis.improvements
    truth = design.gain
    known = improvements[improvements["ci_low"].notna()]
    inside = lambda value: (known["ci_low"] <= value) & (value <= known["ci_high"])  # noqa: E731
    verdicts = analysis.verdicts.assign(supported=analysis.verdicts["verdict"] == "supported")
    verdicts = verdicts.groupby("domain", as_index=False)["supported"].any()
    counted = {
        "H1 t-test over students": _rejected(tests, "H1_improvement_ttest", alpha),
        "H1 t-test over students, average task, methods pooled":
            _rejected(tests[(tests["task"] == "average") & (tests["method"] == "all")], "H1_improvement_ttest", alpha),
        "H1 Friedman over pairs": _rejected(tests, "H1_method_friedman", alpha),
        "H2 Spearman within students": _rejected(tests, "H2_teacher_performance", alpha),
        "H3 size, Spearman over students": _rejected(tests, "H3_student_size", alpha),
        "H3 SFT accuracy (split), over students": _rejected(tests, "H3_student_sft", alpha),
        "bootstrap 95% interval misses the truth": _by_study(known, ~inside(truth)),
        "bootstrap 95% interval excludes 0": _by_study(known, ~inside(0.0)),
        "verdict 'supported', any hypothesis of a domain": _by_study(verdicts, verdicts["supported"]),
    }
    domains = list(dict.fromkeys(improvements["domain"]))
    fitted = domains if mixed_studies is None else [d for d in domains if int(d.rsplit("#", 1)[1]) < mixed_studies]
    if fitted:
        mixed = mixed_effects(improvements[improvements["domain"].isin(fitted)])
        terms = mixed[mixed["term"].astype(str).str.startswith("method[") & mixed["pvalue"].notna()]
        counted["mixed model, method contrasts"] = _by_study(terms, terms["pvalue"] < alpha)
    if store is not None:
        counted |= {
            "H1 t-test, selected temperature (split)": _rejected(tests, "H1_improvement_ttest", alpha,
                                                                 "pvalue_selected"),
            "H4 error consistency, within students": _rejected(tests, "H4_agreement", alpha),
            "H4 KD vs SFT error consistency": _rejected(tests, "H4_kd_vs_sft", alpha),
            "H5 BLEU, within students": _rejected(tests, "H5_fidelity", alpha),
            "McNemar accuracy, per run and task": _by_study(analysis.mcnemar, analysis.mcnemar["pvalue"] < alpha),
            "McNemar agreement, per run and task": _by_study(analysis.agreement_mcnemar,
                                                             analysis.agreement_mcnemar["pvalue"] < alpha),
        }
        raw = []
        for (domain, _), part in improvements[improvements["task"] != "average"].groupby(["domain", "task"]):
            units = part.groupby(["teacher", "student"])[["agreement", "improvement"]].mean().reset_index()
            p = permutation_spearman(units["agreement"], units["improvement"], units["student"], n_permutations,
                                     seed)["pvalue"]
            raw.append({"domain": domain, "rejected": p < alpha})
        raw = pd.DataFrame(raw)
        counted["naive: H4 raw agreement, within students"] = _by_study(raw, raw["rejected"])
    # pairs as units: a student's pairs share its SFT run, so they are not independent
    pairs = improvements.groupby(["domain", "task", "teacher", "student"], as_index=False)["improvement"].mean()
    naive = pairs.groupby(["domain", "task"], as_index=False)["improvement"].agg(
        lambda y: unit_ttest(y, "greater")["pvalue"])
    counted["naive: H1 t-test over pairs, mean temperature"] = _by_study(naive, naive["improvement"] < alpha)
    published = hypothesis_tests(improvement_table(results, temperature="best"), per_method=False)
    counted |= {
        "as published: H1 t-test over rows, best temperature": _rejected(published, "H1_improvement_ttest", alpha),
        "as published: H1 ANOVA over rows": _rejected(published, "H1_method_anova", alpha),
        "as published: H2 Spearman over rows": _rejected(published, "H2_teacher_performance", alpha),
        "as published: H3 size, Spearman over rows": _rejected(published, "H3_student_size", alpha),
        "as published: H3 SFT accuracy, Spearman over rows": _rejected(published, "H3_student_sft", alpha),
    }
    per_study = [{} for _ in range(n_studies)]
    for family, frame in counted.items():
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


def simulate(design: Design, n_studies: int, seed: int = 0, batch: int = 10, mixed_every: int = 1,
             progress: Callable[[int], None] | None = None, **kwargs) -> pd.DataFrame:
    """:func:`study_outcomes` on ``n_studies`` independent studies, ``batch`` per analysis pass; the
    per-family :func:`rates`. The mixed model is fitted in one study of every ``mixed_every``."""
    rng = np.random.default_rng(seed)
    per_study = []
    while len(per_study) < n_studies:
        size = min(batch, n_studies - len(per_study))
        per_study += study_outcomes(design, rng, size, mixed_studies=-(-size // mixed_every), **kwargs)
        if progress is not None:
            progress(len(per_study))
    return rates(per_study).assign(predictions=design.predictions, gain=design.gain, method_gain=design.method_gain)


#: families whose alternative is one method better than the others
METHOD_FAMILIES = "Friedman|mixed model|ANOVA"
#: where benchmarks/null_simulation.py writes its table
VALIDITY_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "null_simulation.json"
VALIDITY_COLUMNS = ["family", "predictions", "type_I", "type_I_se", "tests", "power", "power_se", "studies"]


def validity_table(null: pd.DataFrame, alternatives: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per (family, with/without predictions): the null's rate and SE, and the power under the
    alternative that family is about (a gain of every KD run; for the method tests, of one method)."""
    keys = ["family", "predictions"]
    table = null.rename(columns={"rate": "type_I", "se": "type_I_se"})[keys + ["type_I", "type_I_se", "tests",
                                                                              "studies"]]
    power = pd.concat(alternatives, ignore_index=True).rename(columns={"rate": "power", "se": "power_se"})
    method_tests = power["family"].str.contains(METHOD_FAMILIES)
    gains = power[~method_tests & (power["method_gain"] == 0)][keys + ["power", "power_se"]]
    # the method tests do not use predictions: one power for both rows
    methods = power[method_tests & (power["method_gain"] > 0)].drop_duplicates("family")[["family", "power",
                                                                                          "power_se"]]
    table = pd.concat([table[~table["family"].str.contains(METHOD_FAMILIES)].merge(gains, on=keys, how="left"),
                       table[table["family"].str.contains(METHOD_FAMILIES)].merge(methods, on="family", how="left")])
    # coverage is measured at the true value, which under the alternatives is the gain: no power to report
    table.loc[table["family"] == "bootstrap 95% interval misses the truth", ["power", "power_se"]] = math.nan
    order = {family: i for i, family in enumerate(FAMILIES)}
    table = table.sort_values(["predictions", "family"], key=lambda c: c.map(order) if c.name == "family" else c)
    return table[VALIDITY_COLUMNS].reset_index(drop=True)


def read_validity(path: str | Path = VALIDITY_RESULTS) -> pd.DataFrame:
    """The validity table the benchmark wrote (empty when it has not been run)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=VALIDITY_COLUMNS)
    return pd.DataFrame(json.loads(path.read_text())["table"], columns=VALIDITY_COLUMNS)
