"""Synthetic study outputs for the statistics, fidelity and notebook tests.

``write_study`` writes ``<root>/results.csv``, ``models.csv`` and per-example
predictions under ``<root>/runs`` in the runner's formats, from a seeded generator,
so every accuracy in results.csv equals the mean of its predictions' ``correct``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

TASKS = {"gsm8k": "math", "svamp": "math", "boolq": "commonsense"}
TEACHER = "teach-1.7B"
STUDENTS = {"stu-135M": 0.135, "stu-360M": 0.36, "stu-1B": 1.0}
N_EXAMPLES = 30
WORDS = "first we add the numbers then subtract the rest so the total is".split()


def _answer(task: str, i: int) -> str:
    return ("true" if i % 2 else "false") if task == "boolq" else str(10 + i)


def _wrong(task: str, answer: str, k: int) -> str:
    return ("false" if answer == "true" else "true") if task == "boolq" else str(int(answer) + k)


def _runs() -> list[dict]:
    runs = [dict(run_id="teacher", role="teacher", model=TEACHER, teacher="", method="sft", temperature="",
                 noise_sigma=0.0, p=0.8),
            dict(run_id="base", role="base", model=TEACHER, teacher="", method="", temperature="",
                 noise_sigma=0.0, p=0.3)]
    for s, student in enumerate(STUDENTS):
        base_p = 0.35 + 0.2 * s
        runs.append(dict(run_id=f"{student}-sft", role="student", model=student, teacher="", method="sft",
                         temperature="", noise_sigma=0.0, p=base_p))
        for m, method in enumerate(("fkl", "rkl", "gkd")):
            for temperature, bonus in ((1.0, 0.05), (2.0, 0.1)):
                runs.append(dict(run_id=f"{student}-{method}-t{temperature:g}", role="student", model=student,
                                 teacher=TEACHER, method=method, temperature=temperature, noise_sigma=0.0,
                                 p=base_p + bonus + 0.03 * m - 0.05 * s))
        for sigma in (1.0, 5.0):
            runs.append(dict(run_id=f"{student}-fkl-noise{sigma:g}", role="student", model=student, teacher=TEACHER,
                             method="fkl", temperature=1.0, noise_sigma=sigma, p=base_p - 0.04 * sigma))
        runs.append(dict(run_id=f"{student}-fkl-base", role="student", model=student, teacher=f"{TEACHER}:base",
                         method="fkl", temperature=1.0, noise_sigma=0.0, p=base_p - 0.15))
    return runs


def write_study(root: Path, seed: int = 0) -> Path:
    """Write a synthetic study under ``root``; returns the path of results.csv."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    teacher_preds: dict[str, list[str]] = {}
    for run in _runs():
        for task, domain in TASKS.items():
            records = []
            for i in range(N_EXAMPLES):
                answer = _answer(task, i)
                correct = bool(rng.random() < run["p"])
                if correct:
                    prediction = answer
                elif run["role"] == "student" and rng.random() < 0.5 and task in teacher_preds:
                    prediction = teacher_preds[task][i]
                else:
                    prediction = _wrong(task, answer, 1 + int(rng.integers(3)))
                correct = prediction == answer
                words = " ".join(rng.choice(WORDS, size=4 + int(rng.integers(4))))
                records.append({"id": f"{task}-{i}", "task": task, "prompt": f"Question {i} of {task}",
                                "output": f"{words}. The answer is {prediction}.", "prediction": prediction,
                                "answer": answer, "correct": correct})
            if run["run_id"] == "teacher":
                teacher_preds[task] = [r["prediction"] for r in records]
            pred_dir = root / "runs" / run["run_id"] / "predictions"
            pred_dir.mkdir(parents=True, exist_ok=True)
            (pred_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            n_correct = sum(r["correct"] for r in records)
            rows.append({"study": "synth", "run_id": run["run_id"], "role": run["role"], "model": run["model"],
                         "teacher": run["teacher"], "method": run["method"], "temperature": run["temperature"],
                         "noise_sigma": run["noise_sigma"], "seed": 0, "task": task, "domain": domain,
                         "n": N_EXAMPLES, "correct": n_correct, "accuracy": 100.0 * n_correct / N_EXAMPLES,
                         "ci_low": "", "ci_high": ""})
    results = root / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    pd.DataFrame({"model": list(STUDENTS) + [TEACHER],
                  "n_params": [int(s * 1e9) for s in STUDENTS.values()] + [int(1.7e9)]}).to_csv(
        root / "models.csv", index=False)
    return results


def write_run_status(runs: Path, run_id: str, stage: str, deps: list[str], seconds: float,
                     state: str = "done") -> None:
    """A run directory as the runner leaves it: params.json with the stage and dependencies, status.json."""
    (runs / run_id).mkdir(parents=True, exist_ok=True)
    (runs / run_id / "params.json").write_text(json.dumps({"run": {"stage": stage, "deps": deps}, "resolved": {}}))
    (runs / run_id / "status.json").write_text(json.dumps({"state": state, "seconds": seconds}))
