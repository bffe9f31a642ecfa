"""The local executor evaluates each model as soon as it exists, not behind every training already ready."""

from __future__ import annotations

import threading
import time

from kd_utils import executors, study
from kd_utils.study import LocalExecutor, Run


def test_evaluations_overtake_trainings_that_wait(monkeypatch, tmp_path):
    order: list[str] = []
    lock = threading.Lock()

    def fake_execute_run(run: Run, study_dir, kernels=None) -> dict:
        with lock:
            order.append(run.label)
        return {"state": "done", "label": run.label}

    monkeypatch.setattr(executors, "execute_run", fake_execute_run)
    teacher = Run("teacher", "finetune.ipynb", {"t": 0}, label="teacher")
    runs = [teacher]
    students = [Run("student", "distill.ipynb", {"s": i}, [teacher.id], label=f"train {i}") for i in range(3)]
    runs += students  # plan order puts every training before any evaluation here
    runs += [Run("eval", "evaluate.ipynb", {"e": i}, [s.id], label=f"eval {i}") for i, s in enumerate(students)]
    statuses = study.execute(runs, tmp_path, LocalExecutor(parallel=1))
    assert all(s["state"] == "done" for s in statuses.values())
    # one at a time: each student's evaluation runs before the next student's training starts
    assert order == ["teacher", "train 0", "eval 0", "train 1", "eval 1", "train 2", "eval 2"]


def test_no_more_submitted_than_run_at_once(monkeypatch, tmp_path):
    """A run handed to the pool's queue could not be overtaken by an evaluation that becomes ready later."""
    outstanding, peak = [0], [0]
    lock = threading.Lock()

    def fake_execute_run(run: Run, study_dir, kernels=None) -> dict:
        time.sleep(0.02)
        with lock:
            outstanding[0] -= 1
        return {"state": "done", "label": run.label}

    monkeypatch.setattr(executors, "execute_run", fake_execute_run)
    runs = [Run("student", "distill.ipynb", {"s": i}, label=f"train {i}") for i in range(6)]
    executor = LocalExecutor(parallel=2)
    original = executor.submit

    def submit(run, study_dir, deps):
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        return original(run, study_dir, deps)

    monkeypatch.setattr(executor, "submit", submit)
    statuses = study.execute(runs, tmp_path, executor)
    assert [s["state"] for s in statuses.values()] == ["done"] * 6
    assert peak[0] == 2
