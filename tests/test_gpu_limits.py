"""The GPU machine's return limits and the session plan's budget (benchmarks/gpu_limits.py)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_limits  # noqa: E402


def write(path: Path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: a 17 MiB file costs no disk


def test_within_limits_passes(tmp_path):
    for name in ("results.csv", "models.csv", "report.html"):
        write(tmp_path / name)
    write(tmp_path / "a" / "b" / "deepest-allowed.json")  # two folders down comes back
    write(tmp_path / "big.tgz", gpu_limits.MAX_FILE_BYTES)  # exactly 16 MiB comes back
    assert gpu_limits.returned_problems(tmp_path) == []
    assert gpu_limits.main(["returned", str(tmp_path)]) == 0


def test_file_too_large(tmp_path):
    write(tmp_path / "predictions.tgz", gpu_limits.MAX_FILE_BYTES + 1)
    assert gpu_limits.returned_problems(tmp_path) == ["file too large: predictions.tgz is 16.0 MiB (at most 16 MiB)"]


def test_too_deep(tmp_path):
    write(tmp_path / "study" / "gpu" / "runs" / "results.csv")
    problems = gpu_limits.returned_problems(tmp_path)
    assert problems == ["too deep: study/gpu/runs/results.csv is 3 folders down (at most 2)"]


def test_too_many_files(tmp_path):
    for i in range(gpu_limits.MAX_FILES + 1):
        write(tmp_path / f"f{i}.csv")
    problems = gpu_limits.returned_problems(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("too many files: 9 (at most 8)")
    write_ok = tmp_path / "f0.csv"
    write_ok.unlink()
    assert gpu_limits.returned_problems(tmp_path) == []


@pytest.mark.parametrize("name", ["report (1).html", "résultats.csv", "a:b.json", "tab\tname"])
def test_bad_name(tmp_path, name):
    write(tmp_path / name)
    problems = gpu_limits.returned_problems(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"bad name: {name}")


def test_bad_folder_name_and_link(tmp_path):
    write(tmp_path / "my run" / "results.csv")
    (tmp_path / "link.csv").symlink_to(tmp_path / "my run" / "results.csv")
    problems = gpu_limits.returned_problems(tmp_path)
    assert any(p.startswith("bad name: my run") for p in problems)
    assert "not a plain file: link.csv is a symbolic link" in problems


def test_total_too_large(tmp_path):
    for i in range(5):
        write(tmp_path / f"part{i}.bin", 15 * gpu_limits.MiB)
    assert gpu_limits.returned_problems(tmp_path) == ["too much altogether: 75.0 MiB (at most 64 MiB)"]


def test_cli_names_the_broken_limit(tmp_path, capsys):
    write(tmp_path / "x" / "y" / "z" / "deep.csv")
    assert gpu_limits.main(["returned", str(tmp_path)]) == 1
    assert "RETURN LIMIT BROKEN: too deep: x/y/z/deep.csv" in capsys.readouterr().err


def test_committed_plan_fits_the_budget():
    plan = gpu_limits.load_plan()
    assert gpu_limits.plan_problems(plan) == []
    assert gpu_limits.plan_seconds(plan) <= gpu_limits.PLAN_LIMIT_SECONDS
    # one retry of the longest call fits in what the plan leaves of the session
    assert gpu_limits.SESSION_SECONDS - gpu_limits.plan_seconds(plan) >= 240
    assert all(c["kind"] for c in plan["calls"])


def test_plan_over_budget_or_limits_is_refused():
    plan = copy.deepcopy(gpu_limits.load_plan())
    plan["calls"][-1]["timeout_s"] = 601
    plan["calls"][0]["kind"] = ""
    plan["calls"][0]["carry"] = [f"p{i}" for i in range(9)]
    problems = gpu_limits.plan_problems(plan)
    assert any("timeout_s 601 outside" in p for p in problems)
    assert any("names no kind" in p for p in problems)
    assert any("9 carried paths" in p for p in problems)
    assert any(p.startswith("plan:") and "at most 660 s" in p for p in problems)


@pytest.mark.parametrize("name", ["gpu_commonsense", "gpu_rehearsal"])
def test_gpu_studies_are_valid_and_plan(name):
    """The GPU study and its rehearsal plan in dependency order, and papermill knows every parameter they pass."""
    import papermill

    from kd_utils import params, study

    p = params.load_study(Path(__file__).resolve().parents[1] / "params" / f"{name}.yaml")
    runs = study.plan(p)
    seen, declared = set(), {}
    for run in runs:
        assert all(d in seen for d in run.deps)
        seen.add(run.id)
        if run.notebook not in declared:
            declared[run.notebook] = set(papermill.inspect_notebook(str(study.NOTEBOOKS / run.notebook)))
        assert set(run.parameters) <= declared[run.notebook]
    if name == "gpu_commonsense":  # 3 teachers; 5 students x 2 seeds x (sft + fkl from each teacher); their evals
        stages = [r.stage for r in runs]
        assert (stages.count("teacher"), stages.count("student"), stages.count("eval")) == (3, 40, 43)
        assert p["evaluation"]["n_per_task"] >= 300 and len(p["seeds"]) >= 2 and len(p["models"]["students"]) >= 5
