"""Synthetic studies with known truth, for the whole-pipeline simulations.

:func:`simulate_study` draws one study of a :class:`Design`: per domain teachers and
students (crossed, or the pairs given), fkl / rkl / gkd at several temperatures sharing one
SFT run per student, an untuned base run per student, tasks of ``n_examples`` examples.
Every run's answer to an item is right with probability sigmoid(ability - item
difficulty): item difficulties are shared by every model (``item_sd``, logits), so
correctness correlates across models through the items, and each run's ability is set
so that its expected accuracy on the task's items is its target accuracy. Targets, in
accuracy points (``Design`` fields, all 0 in the sharp null):

- student: uniform 30-70%; base model: the same minus 10 points; teacher: rising with its size;
- SFT run: the student's target plus its training deviation (``run_sd``, shared by the run's tasks);
- KD run: the student's target plus a student effect (``student_effect_sd``), a teacher
  effect centred over the study's teachers and unrelated to the teacher's accuracy
  (``teacher_effect_sd``), a method-by-student effect centred at 0 (``method_student_sd``),
  its own training deviation (``run_sd``), and for power ``gain`` (every KD run),
  ``method_gain`` (the first method) or ``teacher_slope`` x the teacher's centred accuracy.

No KD run copies its teacher under a null of H4: a teacher-level share ``copy_max`` x U(0, 1)
of a KD run's items is drawn with the teacher's own uniform (the same marginal accuracy,
more agreement: an agreement effect of the teacher, unrelated to the gain). Rationale BLEU
is drawn as 50 + a teacher effect (``bleu_teacher_sd``) + noise (sd 10)
(:func:`kd_utils.pipeline_simulation.study_outcomes`).

:data:`SCENARIOS` names the null scenarios (the sharp null kept as one) and the power
scenarios. Putting these studies through the analysis the notebook runs, and counting how often
each test family rejects, is :mod:`kd_utils.pipeline_simulation`'s job: it sits above
:mod:`kd_utils.analysis`, which this package does not import. :func:`read_validity` reads the rates
benchmarks/null_simulation.py wrote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils.constants import PROJECT_ROOT
from kd_utils.predictions import Predictions
from kd_utils.statistics.results import RESULTS_COLUMNS, validate_results

SIM_TASKS = {
    "math": ("gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua"),
    "commonsense": ("boolq", "piqa", "siqa", "winogrande", "arc_e", "arc_c", "obqa"),
}
#: answer options of the multiple-choice tasks (the others are numeric)
CHOICES = {"aqua": 5, "boolq": 2, "piqa": 2, "siqa": 3, "winogrande": 2, "arc_e": 4, "arc_c": 4, "obqa": 4}
TEACHER_SIZES = (3.0, 7.0, 14.0)
STUDENT_SIZES = (0.5, 1.5, 3.0)
#: the paper's design: Qwen teachers 3B, 7B, 14B and Llama 8B; Qwen students 0.5B-7B with the larger
#: Qwen teachers, Llama 1B and 3B with the 8B teacher (11 pairs, 8 of them of three students)
PAPER_TEACHERS = ("Q-3B", "Q-7B", "Q-14B", "L-8B")
PAPER_STUDENTS = ("Q-0.5B", "Q-1.5B", "Q-3B", "Q-7B", "L-1B", "L-3B")
PAPER_PAIRS = ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (3, 4), (3, 5))


@dataclass(frozen=True)
class Design:
    """One simulated study design and its effects (module docstring); the defaults: a sharp-null 3 x 3."""

    n_examples: int = 300
    teachers: tuple[str, ...] = tuple(f"T-{s:g}B" for s in TEACHER_SIZES)
    students: tuple[str, ...] = tuple(f"S-{s:g}B" for s in STUDENT_SIZES)
    pairs: tuple[tuple[int, int], ...] | None = None  # (teacher index, student index); None: crossed
    methods: tuple[str, ...] = ("fkl", "rkl", "gkd")
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0)
    gain: float = 0.0  # points added to every KD run's target accuracy
    method_gain: float = 0.0  # points added to the first method's runs only
    teacher_slope: float = 0.0  # points of gain per point of the teacher's (centred) accuracy
    item_sd: float = 0.0  # sd of item difficulty, logits
    teacher_effect_sd: float = 0.0  # points; centred over the study's teachers
    student_effect_sd: float = 0.0  # points
    method_student_sd: float = 0.0  # points
    run_sd: float = 0.0  # points; training deviation of every SFT and KD run
    copy_max: float = 0.0  # largest teacher-level share of items coupled to the teacher
    bleu_teacher_sd: float = 0.0  # points of BLEU
    predictions: bool = True
    tasks: tuple[tuple[str, str], ...] = tuple((t, d) for d, names in SIM_TASKS.items() for t in names)

    @property
    def pair_list(self) -> tuple[tuple[int, int], ...]:
        if self.pairs is not None:
            return self.pairs
        return tuple((i, j) for j in range(len(self.students)) for i in range(len(self.teachers)))


def crossed(n_teachers: int, n_students: int) -> dict:
    """Design fields of a crossed n x m design (every teacher with every student)."""
    return {"teachers": tuple(f"T-{8 + 4 * i:g}B" for i in range(n_teachers)),
            "students": tuple(f"S-{0.5 + 0.5 * j:g}B" for j in range(n_students))}


PAPER_DESIGN = {"teachers": PAPER_TEACHERS, "students": PAPER_STUDENTS, "pairs": PAPER_PAIRS}
#: the effects of the realistic nulls: item difficulty sd 1.5 logits; teacher effects sd 2 points, twice the
#: runs' training deviation of 1 point; method-by-student sd 2 points; student effects sd 1 point
REALISTIC = {"item_sd": 1.5, "teacher_effect_sd": 2.0, "student_effect_sd": 1.0, "method_student_sd": 2.0,
             "run_sd": 1.0, "copy_max": 0.3, "bleu_teacher_sd": 5.0}
#: name -> (design fields, what the scenario is); the nulls first, then the power scenarios
SCENARIOS: dict[str, tuple[dict, str]] = {
    "sharp null, 3 x 3": ({}, "every run Bernoulli with its student's p: no items, no effects (the old simulation)"),
    "item difficulty, 3 x 3": ({"item_sd": 1.5}, "logistic items shared by all models, nothing else"),
    "teacher effects, 3 x 3": ({"item_sd": 1.5, "teacher_effect_sd": 2.0, "run_sd": 1.0},
                               "a teacher effect on the gain twice the run noise, unrelated to teacher accuracy"),
    "method x student, 3 x 3": ({"item_sd": 1.5, "method_student_sd": 2.0, "run_sd": 1.0},
                                "method effects that vary by student, centred at 0"),
    "realistic, 3 x 3": (REALISTIC, "all of the above plus agreement and BLEU carrying teacher effects"),
    "realistic, 5 x 5": (REALISTIC | crossed(5, 5), "the realistic null in a crossed 5 x 5 design"),
    "realistic, paper design": (REALISTIC | PAPER_DESIGN, "the realistic null in the paper's unbalanced design"),
    "power: gain 3 pp, 5 x 5": (REALISTIC | crossed(5, 5) | {"gain": 3.0}, "every KD run 3 points better"),
    "power: one method +3 pp, 5 x 5": (REALISTIC | crossed(5, 5) | {"method_gain": 3.0},
                                       "the first method 3 points better"),
    "power: teacher accuracy slope 0.5, 5 x 5": (REALISTIC | crossed(5, 5) | {"teacher_slope": 0.5},
                                                 "half a point of gain per point of teacher accuracy"),
}


def scenario(name: str, **overrides) -> Design:
    """The :class:`Design` of a named scenario (:data:`SCENARIOS`), with ``overrides`` of its fields."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")
    return Design(**(SCENARIOS[name][0] | overrides))


def _runs(design: Design, rng: np.random.Generator) -> list[dict]:
    """Every run of one domain with its target accuracy shift (points) and who it is."""
    n_t = len(design.teachers)
    u = rng.normal(0.0, design.teacher_effect_sd, n_t) if design.teacher_effect_sd else np.zeros(n_t)
    u = u - u.mean()
    students = {j: rng.normal(0.0, design.student_effect_sd) for j in range(len(design.students))}
    runs = [dict(run_id=t, role="teacher", model=t, teacher="", method="sft", temperature=math.nan, who=("t", i),
                 shift=0.0) for i, t in enumerate(design.teachers)]
    for j, s in enumerate(design.students):
        runs.append(dict(run_id=f"{s}-base", role="base", model=s, teacher="", method="", temperature=math.nan,
                         who=("b", j), shift=-10.0))
        runs.append(dict(run_id=f"{s}-sft", role="student", model=s, teacher="", method="sft", temperature=math.nan,
                         who=("s", j), shift=rng.normal(0.0, design.run_sd) if design.run_sd else 0.0))
        for m, method in enumerate(design.methods):
            v = rng.normal(0.0, design.method_student_sd) if design.method_student_sd else 0.0
            for i in [i for i, jj in design.pair_list if jj == j]:
                for temp in design.temperatures:
                    d = rng.normal(0.0, design.run_sd) if design.run_sd else 0.0
                    runs.append(dict(run_id=f"{s}-{method}-{design.teachers[i]}-t{temp:g}", role="student", model=s,
                                     teacher=design.teachers[i], method=method, temperature=temp, who=("s", j),
                                     teacher_index=i, shift=design.gain + (design.method_gain if m == 0 else 0.0)
                                     + students[j] + u[i] + v + d))
    return runs


#: floor of the Newton step's derivative (the mean of p(1 - p) over items): it never divides by zero when every
#: item's probability saturates at 0 or 1
_MIN_SLOPE = 1e-9


def _abilities(target: np.ndarray, difficulty: np.ndarray) -> np.ndarray:
    """Per run (rows of ``target``), the ability whose mean sigmoid(ability - difficulty) is the target."""
    theta = np.log(target / (1 - target))
    for _ in range(30):  # Newton on a monotone, concave-convex function from the logit start: converges fast
        prob = 1.0 / (1.0 + np.exp(-(theta[:, None] - difficulty[None, :])))
        theta = theta - (prob.mean(axis=1) - target) / np.maximum((prob * (1 - prob)).mean(axis=1), _MIN_SLOPE)
    return theta


def simulate_study(design: Design, rng: np.random.Generator) -> tuple[pd.DataFrame, Predictions | None]:
    """One synthetic study: its results table and (with ``design.predictions``) its predictions in memory."""
    tasks = list(design.tasks)
    n = design.n_examples
    n_t, n_s = len(design.teachers), len(design.students)
    runs = _runs(design, rng)
    p_student = rng.uniform(0.30, 0.70, (n_s, len(tasks)))
    rank = np.argsort(np.argsort([float(t.split("-")[-1].rstrip("B")) for t in design.teachers]))
    p_teacher = np.clip(0.60 + 0.25 * rank[:, None] / max(n_t - 1, 1) + rng.normal(0, 0.03, (n_t, len(tasks))),
                        0.05, 0.95)
    teacher_mean = 100 * p_teacher.mean(axis=1)
    slope = design.teacher_slope * (teacher_mean - teacher_mean.mean())
    copy = rng.uniform(0.0, design.copy_max, n_t) if design.copy_max else np.zeros(n_t)
    target = np.array([p_teacher[r["who"][1]] if r["who"][0] == "t" else
                       p_student[r["who"][1]] + (r["shift"] + (slope[r["teacher_index"]] if "teacher_index" in r
                                                               else 0.0)) / 100 for r in runs])
    target = np.clip(target, 0.02, 0.98)
    teacher_row = {i: k for k, r in enumerate(runs) if r["who"][0] == "t" for i in [r["who"][1]]}
    correct = np.empty((len(runs), len(tasks)))
    tables = {}
    for k, (task, _) in enumerate(tasks):
        difficulty = rng.normal(0.0, design.item_sd, n) if design.item_sd else np.zeros(n)
        prob = 1.0 / (1.0 + np.exp(-(_abilities(target[:, k], difficulty)[:, None] - difficulty[None, :])))
        uniform = rng.random((len(runs), n))
        coupled = np.zeros((len(runs), n), bool)
        for r, run in enumerate(runs):
            if "teacher_index" in run and copy[run["teacher_index"]] > 0:
                coupled[r] = rng.random(n) < copy[run["teacher_index"]]
                uniform[r] = np.where(coupled[r], uniform[teacher_row[run["teacher_index"]]], uniform[r])
        outcomes = uniform < prob
        correct[:, k] = outcomes.sum(axis=1)
        if not design.predictions:
            continue
        ids = np.array([f"{task}-{i}" for i in range(n)])
        options = CHOICES.get(task)
        answer = rng.integers(options, size=n).astype(float) if options else np.arange(n, dtype=float)
        wrong_answers = {}
        for r, run in enumerate(runs):
            wrong = ((answer + rng.integers(1, options, size=n)) % options if options
                     else answer + rng.integers(1, 50, size=n))
            if coupled[r].any():  # a coupled wrong answer is the teacher's wrong answer
                wrong = np.where(coupled[r], wrong_answers[teacher_row[run["teacher_index"]]], wrong)
            wrong_answers[r] = wrong
            tables[(run["run_id"], task)] = pd.DataFrame(
                {"id": ids, "prediction": np.where(outcomes[r], answer, wrong), "correct": outcomes[r],
                 "output": ""})
    rows = [{"study": "simulated", "run_id": run["run_id"], "role": run["role"], "model": run["model"],
             "teacher": run["teacher"], "method": run["method"], "temperature": run["temperature"],
             "noise_sigma": 0.0, "seed": 0.0, "task": task, "domain": domain, "n": float(n),
             "correct": float(correct[r, k]), "accuracy": 100.0 * correct[r, k] / n,
             "ci_low": math.nan, "ci_high": math.nan}
            for r, run in enumerate(runs) for k, (task, domain) in enumerate(tasks)]
    results = validate_results(pd.DataFrame(rows, columns=list(RESULTS_COLUMNS)), "simulated study")
    # the truth the intervals are checked against: each run's expected accuracy on the task's item population
    results["expected_accuracy"] = [100.0 * target[r, k] for r in range(len(runs)) for k in range(len(tasks))]
    return results, Predictions(tables=tables) if design.predictions else None


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


#: where benchmarks/null_simulation.py writes its tables
VALIDITY_RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "null_simulation.json"
VALIDITY_COLUMNS = ["scenario", "family", "rate", "se", "tests", "studies"]


def read_validity(path: str | Path = VALIDITY_RESULTS) -> pd.DataFrame:
    """The per-scenario rates the benchmark wrote (empty when it has not been run)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=VALIDITY_COLUMNS)
    return pd.DataFrame(json.loads(path.read_text())["table"], columns=VALIDITY_COLUMNS)


#: what moved to :mod:`kd_utils.pipeline_simulation` (the part that runs the analysis)
_MOVED = ("COMPARISONS", "FAMILIES", "not_under_the_null", "rates", "simulate", "study_outcomes")


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"kd_utils.statistics.simulation.{name} moved to kd_utils.pipeline_simulation.{name}: "
                             "it runs the analysis (kd_utils.analysis), which the statistics package does not import")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
