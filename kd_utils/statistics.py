"""Hypothesis tests of the KD study, on the paper's published results or on our own runs.

Both modes go through one long table in the study's ``results.csv`` schema (one row
per model run and task): :func:`load_paper_results` converts the paper's CSVs into
it, :func:`load_results` reads and validates ours. From there :func:`improvement_table`
takes the best temperature per (teacher, student, method, task) and subtracts the
student's SFT accuracy, and :func:`hypothesis_tests` runs H1-H5 with scipy.

Conventions, decided once for both modes:
- NaN pairs are dropped per test; ``n`` counts the rows that enter it.
- A test with fewer than ``min_points`` (3) rows is reported with NaN statistic and
  p-value and a ``note`` saying it is not testable; so is a test on constant input
  (a Spearman correlation with a constant variable, a t-test on identical
  improvements, an ANOVA without within-method variance), where the statistic is
  undefined rather than infinite.
- The task-unaware teacher (paper Method ``..._base_teacher_...``; our teacher
  column ``<model>:base``) and teacher-noise runs (noise_sigma > 0) are ablations and
  never enter H1-H5.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.fidelity import load_predictions, predictions_path

KD_METHODS = ("fkl", "rkl", "gkd", "seqkd")
STUDENT_METHODS = ("sft",) + KD_METHODS
ROLES = ("teacher", "student", "base")
BASE_TEACHER_SUFFIX = ":base"
EXPERT, TASK_UNAWARE = "task expert", "task-unaware"

#: the paper's names for our method ids, for display next to the ids
PAPER_METHOD_NAMES = {
    "sft": "SFT",
    "fkl": "SeqKD",
    "rkl": "RevKD",
    "gkd": "GKD",
    "seqkd": "sequence-level KD (Kim & Rush)",
}

#: column names of the paper's result files -> canonical task ids (paper's column order)
PAPER_COLUMN_TASKS = {
    "gsm8k": "gsm8k",
    "SVAMP": "svamp",
    "MultiArith": "multiarith",
    "SingleEq": "singleeq",
    "AddSub": "addsub",
    "AQuA": "aqua",
    "hellaswag": "hellaswag",
    "boolq": "boolq",
    "social_i_qa": "siqa",
    "piqa": "piqa",
    "ARC-Easy": "arc_e",
    "ARC-Challenge": "arc_c",
    "winogrande": "winogrande",
    "openbookqa": "obqa",
    "Average": "average",
}

PAPER_RESULT_FILES = {
    "math": ("math_results_main.csv", "llama_math_results.csv"),
    "commonsense": ("cs_results_main.csv", "llama_cs_results.csv"),
}
#: per domain: metric column -> the paper's file of per-(teacher, student) values
PAPER_FIDELITY_FILES = {
    "math": {"agreement": "EM1.csv", "bleu": "BLEU.csv"},
    "commonsense": {"agreement": "EM1_cs.csv"},
}

RESULTS_COLUMNS = (
    "study", "run_id", "role", "model", "teacher", "method", "temperature",
    "noise_sigma", "seed", "task", "domain", "n", "correct", "accuracy",
    "ci_low", "ci_high",
)
_NUMERIC_RESULTS_COLUMNS = ("temperature", "noise_sigma", "seed", "n", "correct", "ci_low", "ci_high")
TEST_COLUMNS = ("domain", "hypothesis", "method", "task", "statistic", "pvalue", "n")

# (hypothesis, test kind, x column, includes the `average` task)
HYPOTHESES = (
    ("H1_improvement_ttest", "ttest", None, True),
    ("H1_method_anova", "anova", None, True),
    ("H2_teacher_performance", "spearman", "teacher_accuracy", True),
    ("H3_student_size", "spearman", "student_size", True),
    ("H3_student_sft", "spearman", "sft_accuracy", True),
    ("H4_agreement", "spearman", "agreement", False),
    ("H5_fidelity", "spearman", "bleu", False),
)

_DOMAIN_ORDER = ("math", "commonsense")
_TASK_ORDER = (
    "gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua", "mawps", "mathqa",
    "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "average",
)
_METHOD_ORDER = ("all",) + STUDENT_METHODS
_ORDERS = {"domain": _DOMAIN_ORDER, "task": _TASK_ORDER, "method": _METHOD_ORDER}


def method_label(method: str) -> str:
    """Display name of a method id with the paper's name next to it, e.g. 'fkl (SeqKD)'."""
    if method == "all":
        return "all (pooled)"
    return f"{method} ({PAPER_METHOD_NAMES[method]})" if method in PAPER_METHOD_NAMES else method


def _sort(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Stable sort with the study's canonical order for domains, tasks and methods."""

    def key(s: pd.Series) -> pd.Series:
        order = _ORDERS.get(s.name)
        if order is None:
            return s
        rank = {v: i for i, v in enumerate(order)}
        return s.map(lambda v: f"{rank.get(v, len(order)):03d}:{v}")

    return df.sort_values(list(columns), key=key, kind="stable").reset_index(drop=True)


def _coerce_numeric(df: pd.DataFrame, columns: Iterable[str], source: str, required: Iterable[str] = ()) -> pd.DataFrame:
    """Convert columns to floats; a non-numeric (or missing required) value is an error naming column and row."""
    df = df.copy()
    required = set(required)
    for col in columns:
        raw = df[col]
        num = pd.to_numeric(raw, errors="coerce")
        blank = raw.isna() | (raw.astype(str).str.strip() == "")
        bad = num.isna() & (~blank | (col in required))
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw.iloc[pos]
            what = "is missing" if blank.iloc[pos] else f"has non-numeric value {value!r}"
            raise ValueError(
                f"{source}: column {col!r} {what} in row {pos + 1} (file line {pos + 2})"
            )
        df[col] = num.astype(float)
    return df


def parse_model_size(name: str) -> float:
    """Parameters in billions from the last '<number>B' or '<number>M' in a model name; NaN if none.

    'Qwen2.5-0.5B' -> 0.5, 'Llama-3.2-1B' -> 1.0, 'smollm2-135m-instruct' -> 0.135.
    """
    matches = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", str(name), flags=re.IGNORECASE)
    if not matches:
        return math.nan
    number, unit = matches[-1]
    return float(number) / (1000.0 if unit.lower() == "m" else 1.0)


def load_model_sizes(path: str | Path) -> dict[str, float]:
    """Read the runner's models.csv (columns model, n_params = raw parameter count) as model -> billions."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("model", "n_params") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is missing required column(s): {', '.join(missing)}")
    df = _coerce_numeric(df, ["n_params"], str(path), required=["n_params"])
    return {str(m): p / 1e9 for m, p in zip(df["model"], df["n_params"])}


# --------------------------------------------------------------------------- inputs


def validate_results(df: pd.DataFrame, source: str = "results") -> pd.DataFrame:
    """Check a results table against the study schema and return it with numeric columns as floats.

    Errors name the column and the (1-based) row: missing columns, non-numeric or
    missing accuracies, non-numeric optional numbers, missing ids or KD teachers,
    unknown roles or student methods, and duplicate (run_id, task) rows.
    """
    missing = [c for c in RESULTS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source} is missing required column(s): {', '.join(missing)}")
    df = _coerce_numeric(df, ["accuracy"], source, required=["accuracy"])
    df = _coerce_numeric(df, _NUMERIC_RESULTS_COLUMNS, source)
    kd_rows = (df["role"] == "student") & df["method"].isin(KD_METHODS)
    for col, rows in [(c, True) for c in ("run_id", "role", "model", "task", "domain")] + [("teacher", kd_rows)]:
        blank = rows & (df[col].isna() | (df[col].astype(str).str.strip() == ""))
        if blank.any():
            pos = int(np.flatnonzero(blank.to_numpy())[0])
            raise ValueError(f"{source}: column {col!r} is missing in row {pos + 1} (file line {pos + 2})")
    for col, allowed, mask in (
        ("role", ROLES, pd.Series(True, index=df.index)),
        ("method", STUDENT_METHODS, df["role"] == "student"),
    ):
        bad = mask & ~df[col].isin(allowed)
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: column {col!r} has unknown value {df[col].iloc[pos]!r} in row {pos + 1} "
                f"(file line {pos + 2}); expected one of {', '.join(allowed)}"
            )
    dup = df.duplicated(["run_id", "task"])
    if dup.any():
        pos = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(
            f"{source}: duplicate (run_id, task) = ({df['run_id'].iloc[pos]!r}, {df['task'].iloc[pos]!r}) "
            f"in row {pos + 1} (file line {pos + 2})"
        )
    df["noise_sigma"] = df["noise_sigma"].fillna(0.0)
    return df


def load_results(path: str | Path) -> pd.DataFrame:
    """Read and validate a study's results.csv (see :func:`validate_results`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    # no NA parsing: 'n/a' is reported as the non-number it is, empty cells are missing
    return validate_results(pd.read_csv(path, dtype=str, keep_default_na=False), str(path))


def _require_files(directory: Path, names: Iterable[str]) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing paper result file(s) in {directory}: {', '.join(missing)}")


def _read_paper_csv(path: Path, id_columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read one of the paper's wide CSVs; returns the frame (accuracies as floats) and its column -> task map."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in id_columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is missing required column(s): {', '.join(missing)}")
    extra = [c for c in df.columns if c not in id_columns and c != "Pair"]
    unknown = [c for c in extra if c not in PAPER_COLUMN_TASKS]
    if unknown:
        raise ValueError(f"{path}: unknown task column(s) {', '.join(unknown)}")
    df = _coerce_numeric(df, extra, str(path))
    return df, {c: PAPER_COLUMN_TASKS[c] for c in extra}


def _paper_teacher(name: str) -> str:
    """Teacher model name without a checkpoint suffix ('Qwen2.5-3B_ckpt2400' -> 'Qwen2.5-3B')."""
    return str(name).split("_", 1)[0]


def load_paper_results(paper_dir: str | Path) -> pd.DataFrame:
    """The paper's math and commonsense result files as a long table in the results.csv schema.

    Method ``SFT`` -> role student, method sft (and also role teacher for models that
    teach in that domain: the paper's teachers are exactly these fine-tuned models);
    ``BaseModel`` -> role base; Methods containing ``student`` are KD runs: ``RevKD`` ->
    rkl, ``GKD`` -> gkd, otherwise fkl, temperature from ``temp_<t>``, and a
    ``base_teacher`` run gets teacher ``<teacher>:base`` (the expertise ablation).
    run_id is ``<file>:<line>``. The files' Average column becomes task ``average``.
    Two runs with the same (teacher, student, method, temperature) are an error, so
    the later best-over-temperatures is exactly the paper's maximum over runs.
    """
    paper_dir = Path(paper_dir)
    _require_files(paper_dir, [f for files in PAPER_RESULT_FILES.values() for f in files])
    frames = []
    for domain, files in PAPER_RESULT_FILES.items():
        domain_rows = []
        for name in files:
            path = paper_dir / name
            df, tasks = _read_paper_csv(path, ("Teacher", "Student", "Method"))
            for pos, row in enumerate(df.to_dict("records")):
                method_text = str(row["Method"])
                run = {"study": "paper", "run_id": f"{name}:{pos + 2}", "model": row["Student"],
                       "teacher": math.nan, "temperature": math.nan, "noise_sigma": 0.0,
                       "seed": 0.0, "domain": domain}
                if "student" in method_text:
                    method = "rkl" if "RevKD" in method_text else "gkd" if "GKD" in method_text else "fkl"
                    teacher = _paper_teacher(row["Teacher"])
                    if "base_teacher" in method_text:
                        teacher += BASE_TEACHER_SUFFIX
                    temp = re.search(r"temp_(\d+(?:\.\d+)?)", method_text)
                    run.update(role="student", method=method, teacher=teacher,
                               temperature=float(temp.group(1)) if temp else math.nan)
                elif method_text == "SFT":
                    run.update(role="student", method="sft")
                elif method_text == "BaseModel":
                    run.update(role="base", method="base")
                else:
                    raise ValueError(f"{path}: unknown Method {method_text!r} in row {pos + 1} (file line {pos + 2})")
                for col, task in tasks.items():
                    if not pd.isna(row[col]):
                        domain_rows.append({**run, "task": task, "accuracy": row[col]})
        dom = pd.DataFrame(domain_rows)
        kd = dom[(dom["role"] == "student") & dom["method"].isin(KD_METHODS)]
        dup = kd.drop_duplicates("run_id").duplicated(["teacher", "model", "method", "temperature"], keep=False)
        if dup.any():
            runs = ", ".join(kd.drop_duplicates("run_id")[dup.to_numpy()]["run_id"])
            raise ValueError(f"paper results: runs {runs} repeat (teacher, student, method, temperature)")
        teachers = set(kd["teacher"])
        as_teacher = dom[(dom["method"] == "sft") & dom["model"].isin(teachers)].assign(role="teacher")
        frames += [dom, as_teacher]
    out = pd.concat(frames, ignore_index=True)
    for col in ("n", "correct", "ci_low", "ci_high"):
        out[col] = math.nan
    return out[list(RESULTS_COLUMNS)]


def load_paper_fidelity(paper_dir: str | Path) -> pd.DataFrame:
    """Teacher-student agreement (EM1*.csv) and rationale BLEU (BLEU.csv), rows with Method ``KD``.

    Returns columns domain, teacher, student, task, agreement, bleu (bleu NaN for
    commonsense, which has no BLEU file). The files name teachers without checkpoint
    suffixes; the same suffix stripping as for the result files is applied anyway,
    so the join to every method's row is on (domain, teacher, student, task).
    """
    paper_dir = Path(paper_dir)
    _require_files(paper_dir, [f for files in PAPER_FIDELITY_FILES.values() for f in files.values()])
    frames = []
    for domain, files in PAPER_FIDELITY_FILES.items():
        merged = None
        for metric, name in files.items():
            path = paper_dir / name
            df, tasks = _read_paper_csv(path, ("Teacher", "Student", "Method"))
            df = df[df["Method"] == "KD"].assign(teacher=lambda d: d["Teacher"].map(_paper_teacher))
            long = df.melt(id_vars=["teacher", "Student"], value_vars=list(tasks), var_name="column", value_name=metric)
            long = long.assign(task=long["column"].map(tasks)).rename(columns={"Student": "student"})
            long = long.drop(columns="column")
            if long.duplicated(["teacher", "student", "task"]).any():
                raise ValueError(f"{path}: more than one KD row for a (Teacher, Student) pair")
            merged = long if merged is None else merged.merge(long, on=["teacher", "student", "task"], how="outer")
        frames.append(merged.assign(domain=domain))
    out = pd.concat(frames, ignore_index=True)
    if "bleu" not in out:
        out["bleu"] = math.nan
    return _sort(out[["domain", "teacher", "student", "task", "agreement", "bleu"]], ["domain", "teacher", "student", "task"])


# --------------------------------------------------------------------------- improvements


def with_task_average(results: pd.DataFrame) -> pd.DataFrame:
    """Add task ``average`` rows (mean accuracy over the domain's tasks) unless the table has them.

    A run gets an average only if it covers every task that appears in its domain, so
    that averages of different runs are comparable. n/correct/CIs of averages are NaN.
    """
    if (results["task"] == "average").any():
        return results
    rows = []
    for domain, dom in results.groupby("domain"):
        all_tasks = set(dom["task"])
        for _, run in dom.groupby("run_id"):
            if set(run["task"]) == all_tasks:
                rows.append(run.iloc[0].to_dict() | {
                    "task": "average", "accuracy": run["accuracy"].mean(),
                    "n": math.nan, "correct": math.nan, "ci_low": math.nan, "ci_high": math.nan})
    return pd.concat([results, pd.DataFrame(rows, columns=results.columns)], ignore_index=True) if rows else results


def kd_pairs(results: pd.DataFrame) -> pd.DataFrame:
    """Every KD student run x task (``average`` included) with its SFT baseline and improvement.

    The baseline is the student's SFT run with the same seed; without one, the mean
    over the student's SFT seeds (and, for per-example tests, its lowest-seed SFT run).
    ``teacher`` is the teacher model without ':base'; ``expertise`` says whether it was
    the task expert or the task-unaware teacher. Improvement is NaN without any SFT run.
    """
    res = with_task_average(results)
    students = res[res["role"] == "student"]
    kd = students[students["method"].isin(KD_METHODS)]
    sft = students[students["method"] == "sft"]
    dup = sft.duplicated(["domain", "model", "task", "seed"])
    if dup.any():
        row = sft[dup.to_numpy()].iloc[0]
        raise ValueError(f"more than one SFT run for model {row['model']!r}, task {row['task']!r}, seed {row['seed']}")
    same_seed = sft[["domain", "model", "task", "seed", "run_id", "accuracy"]].rename(
        columns={"run_id": "sft_run_id", "accuracy": "sft_accuracy"})
    fallback = (sft.sort_values("seed").groupby(["domain", "model", "task"])
                .agg(fallback_run_id=("run_id", "first"), fallback_accuracy=("accuracy", "mean")).reset_index())
    out = (kd.merge(same_seed, on=["domain", "model", "task", "seed"], how="left")
           .merge(fallback, on=["domain", "model", "task"], how="left"))
    unmatched = out["sft_run_id"].isna()
    out["sft_run_id"] = out["sft_run_id"].where(~unmatched, out["fallback_run_id"])
    out["sft_accuracy"] = out["sft_accuracy"].where(~unmatched, out["fallback_accuracy"])
    base = out["teacher"].astype(str).str.endswith(BASE_TEACHER_SUFFIX)
    out = out.assign(
        teacher=out["teacher"].astype(str).str.removesuffix(BASE_TEACHER_SUFFIX),
        expertise=np.where(base, TASK_UNAWARE, EXPERT),
        student=out["model"],
        improvement=out["accuracy"] - out["sft_accuracy"],
    )
    columns = ["domain", "teacher", "expertise", "student", "method", "temperature", "noise_sigma", "seed",
               "task", "run_id", "accuracy", "n", "correct", "sft_run_id", "sft_accuracy", "improvement"]
    return out[columns]


_KEYS = ["domain", "teacher", "student", "method", "task"]


def _seed_means(pairs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return (pairs.groupby(keys, dropna=False)
            .agg(accuracy=("accuracy", "mean"), sft_accuracy=("sft_accuracy", "mean"),
                 improvement=("improvement", "mean"), n_seeds=("run_id", "count"))
            .reset_index())


def improvement_table(results: pd.DataFrame, model_sizes: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per (domain, teacher, student, method, task): the best temperature and its improvement.

    Only expert-teacher runs without teacher noise enter. Seeds are averaged per
    temperature, then the temperature with the highest KD accuracy is taken per task
    independently (the paper's per-column maximum; ties go to the lower temperature).
    Adds ``teacher_accuracy`` (mean over the teacher's role=teacher runs),
    ``sft_accuracy`` (the student's SFT baseline) and ``student_size`` in billions
    (``model_sizes`` first, else parsed from the name, else NaN).
    """
    pairs = kd_pairs(results)
    main = pairs[(pairs["noise_sigma"] == 0) & (pairs["expertise"] == EXPERT)].dropna(subset=["improvement"])
    by_temp = _seed_means(main, _KEYS + ["temperature"]).sort_values("temperature", kind="stable")
    best = by_temp.loc[by_temp.groupby(_KEYS, dropna=False)["accuracy"].idxmax()]
    teachers = with_task_average(results)
    teachers = (teachers[teachers["role"] == "teacher"].groupby(["domain", "model", "task"])["accuracy"].mean()
                .rename("teacher_accuracy").reset_index().rename(columns={"model": "teacher"}))
    best = best.merge(teachers, on=["domain", "teacher", "task"], how="left")
    sizes = dict(model_sizes or {})
    best["student_size"] = [sizes[s] if s in sizes else parse_model_size(s) for s in best["student"]]
    columns = _KEYS + ["temperature", "accuracy", "sft_accuracy", "improvement", "teacher_accuracy",
                       "student_size", "n_seeds"]
    return _sort(best[columns], _KEYS)


def attach_fidelity(improvements: pd.DataFrame, fidelity: pd.DataFrame) -> pd.DataFrame:
    """Join fidelity metrics (agreement, bleu, ...) to the improvement rows.

    Joins on whichever of domain, teacher, student, method, temperature, task the
    fidelity table has: the paper's per-(teacher, student) values go to every method's
    row; our per-run values are averaged over seeds and matched to the best
    temperature. Rows with teacher noise or a task-unaware teacher never match.
    """
    keys = [k for k in ("domain", "teacher", "student", "method", "temperature", "task") if k in fidelity.columns]
    metrics = [c for c in ("agreement", "agreement_teacher_correct", "bleu", "embedding_similarity")
               if c in fidelity.columns]
    if "noise_sigma" in fidelity.columns:
        fidelity = fidelity[fidelity["noise_sigma"].fillna(0) == 0]
    means = fidelity.groupby(keys, dropna=False)[metrics].mean().reset_index()
    return improvements.drop(columns=[m for m in metrics if m in improvements]).merge(means, on=keys, how="left")


# --------------------------------------------------------------------------- hypothesis tests


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


def spearman_permutation_pvalue(x: Sequence[float], y: Sequence[float], n_resamples: int = 9999,
                                seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman rho, for the small samples of our own studies.

    scipy's Spearman p-value is asymptotic (a t approximation): with 3 points it
    reports p = 0 for a perfect rank correlation, whose exact p is 1/3. Here the
    pairing of x with y is permuted: all n! pairings when n! <= n_resamples (exact),
    else ``n_resamples`` random ones (p = (hits + 1) / (n_resamples + 1)).
    """
    rx = stats.rankdata(np.asarray(x, float))
    ry = stats.rankdata(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    if denom == 0:
        return math.nan
    observed = abs(rx @ ry) / denom
    exact = math.factorial(rx.size) <= n_resamples
    if exact:
        perms = np.array(list(itertools.permutations(range(rx.size))))
    else:
        perms = np.argsort(np.random.default_rng(seed).random((n_resamples, rx.size)), axis=1)
    # tolerance: ties between permuted and observed |rho| must count as hits despite rounding
    hits = int(np.sum(np.abs(rx[perms] @ ry) / denom >= observed - 1e-12))
    return hits / len(perms) if exact else (hits + 1) / (n_resamples + 1)


# "medium" effects (Cohen): d = 0.5 for the t-test, f = 0.25 for the ANOVA, rho = 0.3 for Spearman
MEDIUM_EFFECT = {"ttest": 0.5, "anova": 0.25, "spearman": 0.3}
ADEQUATE_POWER = 0.8


def medium_effect_power(kind: str, n: int, k_groups: int = 3, alpha: float = 0.05) -> float:
    """Power of a test on ``n`` points to detect a medium effect at ``alpha``.

    t-test: one-sided one-sample (statsmodels); ANOVA: ``k_groups`` groups (statsmodels);
    Spearman: two-sided, Fisher-z normal approximation with atanh(rho) * sqrt(n - 3).
    """
    from statsmodels.stats.power import FTestAnovaPower, TTestPower

    if kind == "ttest":
        return float(TTestPower().power(MEDIUM_EFFECT[kind], nobs=n, alpha=alpha, alternative="larger")) if n > 1 \
            else math.nan
    if kind == "anova":
        return float(FTestAnovaPower().power(MEDIUM_EFFECT[kind], nobs=n, alpha=alpha, k_groups=k_groups)) \
            if n > k_groups else math.nan
    if n <= 3:
        return math.nan
    shift, z = math.atanh(MEDIUM_EFFECT[kind]) * math.sqrt(n - 3), stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))


def _test(kind: str, data: pd.DataFrame, x: str | None, min_points: int,
          permutation: bool) -> tuple[float, float, int, str, float, float]:
    """Run one hypothesis test on the rows of ``data`` without NaN.

    Returns (statistic, pvalue, n, note, permutation p-value or NaN, power for a medium effect).
    A test that runs but has power below ADEQUATE_POWER is noted as underpowered.
    """
    data = data.dropna(subset=["improvement"] + ([x] if x else []))
    n = len(data)
    if n < min_points:
        return math.nan, math.nan, n, f"not testable: {n} point(s) < {min_points}", math.nan, math.nan
    if kind == "ttest":
        result = improvement_ttest(data["improvement"])
    elif kind == "anova":
        result = method_anova([g["improvement"] for _, g in data.groupby("method")])
    else:
        result = spearman(data[x], data["improvement"])
    exact = (spearman_permutation_pvalue(data[x], data["improvement"])
             if permutation and kind == "spearman" and not result[2] else math.nan)
    power = medium_effect_power(kind, n, data["method"].nunique() if kind == "anova" else 3)
    note = result[2]
    if not note and not power >= ADEQUATE_POWER:
        note = f"underpowered: {n} points, power {power:.2f} for a medium effect ({kind} {MEDIUM_EFFECT[kind]})"
    return result[0], result[1], n, note, exact, power


def hypothesis_tests(improvements: pd.DataFrame, min_points: int = 3, permutation: bool = False) -> pd.DataFrame:
    """H1-H5 per domain, hypothesis, method (``all`` pooled, then each method) and task.

    - H1_improvement_ttest: one-sample t-test of improvement > 0 (one-sided).
    - H1_method_anova: one-way ANOVA of improvement across the KD methods present (``all`` only).
    - H2_teacher_performance / H3_student_size / H3_student_sft: Spearman of improvement
      with the teacher's accuracy / student size (B) / the student's SFT accuracy.
    - H4_agreement / H5_fidelity: Spearman with agreement / BLEU, tasks without
      ``average``; emitted for a domain only where that column has data.
    Returns columns domain, hypothesis, method, task, statistic, pvalue, n, note, power (to
    detect a medium effect; tests below 0.8 are noted as underpowered), and
    with ``permutation`` also ``pvalue_permutation`` (Spearman rows; see
    :func:`spearman_permutation_pvalue`), which small studies should read instead of
    scipy's asymptotic p-value.
    """
    rows = []
    for domain, dom in _sort(improvements, ["domain"]).groupby("domain", sort=False):
        tasks = _sort(dom[["task"]].drop_duplicates(), ["task"])["task"].tolist()
        methods = _sort(dom[["method"]].drop_duplicates(), ["method"])["method"].tolist()
        for hypothesis, kind, x, with_average in HYPOTHESES:
            if x is not None and (x not in dom.columns or dom[x].isna().all()):
                continue
            for method in ["all"] + ([] if kind == "anova" else methods):
                subset = dom if method == "all" else dom[dom["method"] == method]
                for task in tasks:
                    if task == "average" and not with_average:
                        continue
                    stat, p, n, note, perm, power = _test(kind, subset[subset["task"] == task], x, min_points,
                                                          permutation)
                    rows.append({"domain": domain, "hypothesis": hypothesis, "method": method, "task": task,
                                 "statistic": stat, "pvalue": p, "n": n, "note": note, "power": power,
                                 "pvalue_permutation": perm})
    columns = list(TEST_COLUMNS) + ["note", "power"] + (["pvalue_permutation"] if permutation else [])
    return pd.DataFrame(rows, columns=columns)


def paper_improvements(paper_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's results as a long table and its improvement table with agreement and BLEU attached.

    Needs the four result files and EM1.csv, EM1_cs.csv, BLEU.csv in ``paper_dir``;
    a missing file is an error naming every missing file.
    """
    paper_dir = Path(paper_dir)
    _require_files(paper_dir, [f for files in PAPER_RESULT_FILES.values() for f in files]
                   + [f for files in PAPER_FIDELITY_FILES.values() for f in files.values()])
    results = load_paper_results(paper_dir)
    return results, attach_fidelity(improvement_table(results), load_paper_fidelity(paper_dir))


def paper_hypothesis_tests(paper_dir: str | Path) -> pd.DataFrame:
    """The paper-mode table: columns domain, hypothesis, method, task, statistic, pvalue, n."""
    return hypothesis_tests(paper_improvements(paper_dir)[1])[list(TEST_COLUMNS)]


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


def paper_table(tests: pd.DataFrame, domain: str) -> pd.DataFrame:
    """One domain's tests laid out like the paper's tables: a row per hypothesis and method,
    a column per task under the paper's column names, cells 'statistic (p)'."""
    names = {task: col for col, task in PAPER_COLUMN_TASKS.items()}
    order = [t for t in PAPER_COLUMN_TASKS.values()]
    dom = tests[tests["domain"] == domain]

    def cell(row: pd.Series) -> str:
        if pd.isna(row["statistic"]):
            return "n/a"
        p = "p<0.001" if row["pvalue"] < 0.001 else f"p={row['pvalue']:.3f}"
        return f"{row['statistic']:.3f} ({p})"

    table = dom.assign(cell=dom.apply(cell, axis=1), method=dom["method"].map(method_label))
    wide = table.pivot_table(index=["hypothesis", "method"], columns="task", values="cell", aggfunc="first", sort=False)
    wide = wide[[t for t in order if t in wide.columns] + [t for t in wide.columns if t not in order]]
    return wide.fillna("").rename(columns=lambda t: names.get(t, t))


# --------------------------------------------------------------------------- per-example tests


def mcnemar_test(kd_correct: Sequence[bool], sft_correct: Sequence[bool]) -> dict[str, float]:
    """Exact (binomial) McNemar test of KD vs SFT on the same examples.

    Exact rather than chi-square because the discordant counts of small test sets are
    often small. Returns n, kd_only (KD right, SFT wrong), sft_only, statistic
    (statsmodels' exact statistic: min(kd_only, sft_only)) and the two-sided p-value.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    kd = np.asarray(kd_correct, dtype=bool)
    sft = np.asarray(sft_correct, dtype=bool)
    if kd.shape != sft.shape:
        raise ValueError(f"McNemar needs paired examples: {kd.size} KD vs {sft.size} SFT outcomes")
    table = [[int(np.sum(kd & sft)), int(np.sum(kd & ~sft))], [int(np.sum(~kd & sft)), int(np.sum(~kd & ~sft))]]
    res = mcnemar(table, exact=True)
    return {"n": int(kd.size), "kd_only": table[0][1], "sft_only": table[1][0],
            "statistic": float(res.statistic), "pvalue": float(res.pvalue)}


def bootstrap_improvement_ci(strata: Sequence[tuple[Sequence[float], Sequence[float]]], paired: bool = True,
                             n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of an improvement in percentage points.

    ``strata`` holds (KD outcomes, SFT outcomes) 0/1 arrays, one pair per task and
    seed; the statistic is the mean over strata of mean(KD) - mean(SFT), times 100,
    which is how the improvement of a task (one or more seeds) or of ``average``
    (tasks x seeds) is defined. Examples are resampled within each stratum: paired
    (the same indices for KD and SFT, for predictions on the same examples) or
    independently (when only per-run counts are known). The interval reflects
    test-set sampling only, not training-seed variation.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for kd, sft in strata:
        kd, sft = np.asarray(kd, float), np.asarray(sft, float)
        if paired and kd.size != sft.size:
            raise ValueError(f"paired bootstrap needs equal lengths, got {kd.size} and {sft.size}")
        kd_idx = rng.integers(0, kd.size, (n_resamples, kd.size))
        sft_idx = kd_idx if paired else rng.integers(0, sft.size, (n_resamples, sft.size))
        total += kd[kd_idx].mean(axis=1) - sft[sft_idx].mean(axis=1)
    total *= 100.0 / len(strata)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(total, [alpha, 1.0 - alpha])
    return float(low), float(high)


def best_run_pairs(results: pd.DataFrame, improvements: pd.DataFrame) -> pd.DataFrame:
    """The per-seed (KD run, SFT run) pairs behind each improvement row (at its best temperature)."""
    pairs = kd_pairs(results)
    pairs = pairs[(pairs["noise_sigma"] == 0) & (pairs["expertise"] == EXPERT)]
    return improvements[_KEYS + ["temperature"]].merge(pairs, on=_KEYS + ["temperature"], how="inner")


def _outcomes(run_id: str, task: str, runs_dir: Path | None, cache: dict[Path, pd.DataFrame]) -> pd.DataFrame | None:
    """Per-example correctness (id, correct) of a run on a task from its predictions; None without the file."""
    if runs_dir is None:
        return None
    path = predictions_path(runs_dir, run_id, task)
    if not path.is_file():
        return None
    if path not in cache:
        cache[path] = load_predictions(path)[["id", "correct"]]
    return cache[path]


def _paired_outcomes(kd: pd.DataFrame, sft: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """KD and SFT correctness (0/1) on the examples both have, joined on id."""
    joined = kd.merge(sft, on="id", suffixes=("_kd", "_sft"))
    return joined["correct_kd"].to_numpy(float), joined["correct_sft"].to_numpy(float)


def _from_counts(n: float, correct: float) -> np.ndarray:
    return np.repeat([1.0, 0.0], [int(correct), int(n - correct)])


def _strata(units: list[tuple[str, str, str]], counts: pd.DataFrame, runs_dir: Path | None,
            cache: dict[Path, pd.DataFrame]) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool, str]:
    """Bootstrap strata for (KD run, SFT run, task) units: paired from predictions if all exist,
    else unpaired from n/correct counts if all are known, else none. Returns (strata, paired, basis)."""
    outcomes = [(_outcomes(k, t, runs_dir, cache), _outcomes(s, t, runs_dir, cache)) for k, s, t in units]
    if units and all(kd is not None and sft is not None for kd, sft in outcomes):
        return [_paired_outcomes(kd, sft) for kd, sft in outcomes], True, "paired bootstrap over examples"
    known = [(counts.loc[(k, t)], counts.loc[(s, t)]) for k, s, t in units]
    if units and not any(kd.isna().any() or sft.isna().any() for kd, sft in known):
        strata = [(_from_counts(kd["n"], kd["correct"]), _from_counts(sft["n"], sft["correct"])) for kd, sft in known]
        return strata, False, "bootstrap of per-run counts (unpaired)"
    return [], False, "no per-example data"


def mcnemar_tests(results: pd.DataFrame, improvements: pd.DataFrame, runs_dir: str | Path) -> pd.DataFrame:
    """McNemar tests of KD vs SFT per improvement row (tasks only) and seed, from predictions.

    KD and SFT predictions are joined on example id. Holm-adjusted p-values are added
    across the tasks of each (domain, teacher, student, method, seed). Rows whose
    prediction files are missing are skipped.
    """
    runs_dir = Path(runs_dir)
    cache: dict[Path, pd.DataFrame] = {}
    rows = []
    pairs = best_run_pairs(results, improvements)
    for row in pairs[pairs["task"] != "average"].to_dict("records"):
        kd = _outcomes(row["run_id"], row["task"], runs_dir, cache)
        sft = _outcomes(row["sft_run_id"], row["task"], runs_dir, cache)
        if kd is None or sft is None:
            continue
        test = mcnemar_test(*(o.astype(bool) for o in _paired_outcomes(kd, sft)))
        rows.append({k: row[k] for k in _KEYS + ["temperature", "seed", "run_id", "sft_run_id"]} | test)
    columns = _KEYS + ["temperature", "seed", "run_id", "sft_run_id", "n", "kd_only", "sft_only", "statistic", "pvalue"]
    out = pd.DataFrame(rows, columns=columns)
    return holm_adjust(out, family=("domain", "teacher", "student", "method", "seed"))


def improvement_intervals(results: pd.DataFrame, improvements: pd.DataFrame, runs_dir: str | Path | None = None,
                          n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Add bootstrap ``ci_low``/``ci_high`` (percentage points) and ``ci_basis`` to every improvement row.

    Paired over examples when every needed prediction file exists under ``runs_dir``;
    otherwise independent resampling of each run's n/correct counts; NaN when neither
    is known (the paper's results). ``average`` rows resample every task of the runs.
    """
    runs_dir = Path(runs_dir) if runs_dir is not None else None
    counts = results.set_index(["run_id", "task"])[["n", "correct"]]
    tasks_of = results[results["task"] != "average"].groupby(["run_id", "domain"])["task"].apply(list)
    cache: dict[Path, pd.DataFrame] = {}
    pairs = best_run_pairs(results, improvements).set_index(_KEYS).sort_index()
    lows, highs, bases = [], [], []
    for row in improvements.to_dict("records"):
        runs = pairs.loc[[tuple(row[k] for k in _KEYS)]]
        units = [(kd, sft, task) for kd, sft in zip(runs["run_id"], runs["sft_run_id"])
                 for task in (tasks_of.get((kd, row["domain"]), []) if row["task"] == "average" else [row["task"]])]
        strata, paired, basis = _strata(units, counts, runs_dir, cache)
        low, high = bootstrap_improvement_ci(strata, paired, n_resamples, level, seed) if strata else (math.nan,) * 2
        lows.append(low)
        highs.append(high)
        bases.append(basis)
    return improvements.assign(ci_low=lows, ci_high=highs, ci_basis=bases)


# --------------------------------------------------------------------------- models and ablations


def mixed_effects(improvements: pd.DataFrame) -> pd.DataFrame:
    """Per domain: improvement ~ log(student size in B) + method, random intercept per task (statsmodels MixedLM, REML).

    Tasks only (not ``average``). A term enters only if it varies (>= 2 sizes /
    methods); the reference method is the first of fkl, rkl, gkd, seqkd present. With
    fewer than 3 rows or 2 tasks, or if the fit fails, one 'not testable' row is
    returned for the domain; ``note`` says whether the fit converged and keeps the
    optimizer's warnings (statsmodels retries other optimizers when one fails).
    """
    import statsmodels.formula.api as smf

    rows = []
    columns = ["domain", "term", "coef", "se", "z", "pvalue", "ci_low", "ci_high", "n", "n_tasks", "note"]
    for domain, dom in _sort(improvements, ["domain"]).groupby("domain", sort=False):
        data = dom[dom["task"] != "average"].dropna(subset=["improvement"])
        terms = []
        if data["student_size"].notna().all() and data["student_size"].nunique() >= 2:
            data = data.assign(log_size=np.log(data["student_size"]))
            terms.append("log_size")
        methods = [m for m in KD_METHODS if m in set(data["method"])]
        if len(methods) >= 2:
            terms.append(f"C(method, Treatment({methods[0]!r}))")
        n, n_tasks = len(data), data["task"].nunique()
        if n < 3 or n_tasks < 2:
            rows.append({"domain": domain, "term": "model", "n": n, "n_tasks": n_tasks,
                         "note": f"not testable: {n} row(s), {n_tasks} task(s)"})
            continue
        formula = "improvement ~ " + (" + ".join(terms) if terms else "1")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fit = smf.mixedlm(formula, data, groups=data["task"]).fit(reml=True)
            except (np.linalg.LinAlgError, ValueError) as err:
                rows.append({"domain": domain, "term": "model", "n": n, "n_tasks": n_tasks,
                             "note": f"not testable: fit failed ({err})"})
                continue
        messages = "; ".join(sorted({str(w.message).splitlines()[0] for w in caught}))
        if not fit.converged:
            note = f"NOT converged: {messages}"
        else:
            note = f"converged; warnings while fitting: {messages}" if messages else ""
        ci = fit.conf_int()
        for term in fit.fe_params.index:
            label = re.sub(r"C\(method, Treatment\('(\w+)'\)\)\[T\.(\w+)\]", r"method[\2 vs \1]", term)
            rows.append({"domain": domain, "term": label.replace("log_size", "log(student_size_B)"),
                         "coef": fit.fe_params[term], "se": fit.bse[term], "z": fit.tvalues[term],
                         "pvalue": fit.pvalues[term], "ci_low": ci.loc[term, 0], "ci_high": ci.loc[term, 1],
                         "n": n, "n_tasks": n_tasks, "note": note})
        rows.append({"domain": domain, "term": "task variance (random intercept)",
                     "coef": float(fit.cov_re.iloc[0, 0]), "n": n, "n_tasks": n_tasks, "note": note})
    return pd.DataFrame(rows, columns=columns)


ABLATION_FACTORS = ("temperature", "noise_sigma", "expertise")


def ablation_table(results: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Seed-mean accuracy and improvement of KD runs as ``factor`` varies, the rest held fixed.

    temperature: expert teacher, no noise; noise_sigma: expert teacher (sigma 0 is the
    baseline); expertise: no noise. Only configurations (teacher, student, method,
    task and the other factors) where the factor takes at least two values are kept.
    """
    if factor not in ABLATION_FACTORS:
        raise ValueError(f"unknown ablation factor {factor!r}; expected one of {', '.join(ABLATION_FACTORS)}")
    pairs = kd_pairs(results)
    if factor != "expertise":
        pairs = pairs[pairs["expertise"] == EXPERT]
    if factor != "noise_sigma":
        pairs = pairs[pairs["noise_sigma"] == 0]
    config = _KEYS + [f for f in ABLATION_FACTORS if f != factor]
    table = _seed_means(pairs, config + [factor])
    varies = table.groupby(config, dropna=False)[factor].transform("nunique") >= 2
    return _sort(table[varies], config + [factor])
