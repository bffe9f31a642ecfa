"""The smoke study end to end through the real runner and papermill (tiny random models)."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import mini_content

from kd_utils import study
from kd_utils.params import load_study

pytestmark = pytest.mark.slow


def comparable(results: pd.DataFrame) -> pd.DataFrame:
    return results.sort_values(["run_id", "task"]).reset_index(drop=True)


def test_smoke_study_end_to_end(finished):
    code, study_dir = finished
    assert code == 0
    results = pd.read_csv(study_dir / "results.csv")
    assert list(results.columns) == list(study.RESULT_COLUMNS)
    assert set(results["role"]) == {"base", "teacher", "student"}
    assert set(results.loc[results.role == "student", "method"]) == {"sft", "fkl", "rkl"}
    assert set(results["task"]) == {"gsm8k", "aqua", "boolq"} and (results["n"] == 2).all()
    assert (study_dir / "report.html").stat().st_size > 10_000
    run_dirs = [p for p in (study_dir / "runs").iterdir() if (p / "status.json").exists()]
    for run_dir in run_dirs:
        assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
        assert list(run_dir.glob("*.html")), run_dir
    sizes = pd.read_csv(study_dir / "models.csv")
    assert "tiny-L1" in set(sizes["model"])
    # the small files a committed study keeps: per-example correctness of every row, the analysis tables
    export = pd.read_csv(study_dir / "correctness.csv.gz")
    assert len(export) == results["n"].sum() and set(export["run_id"]) == set(results["run_id"])
    assert (study_dir / "analysis" / "verdicts.csv").is_file()
    assert (study_dir / "analysis" / "provenance.json").is_file()
    analysis_run = next(p for p in run_dirs if p.name.startswith("analysis-"))
    figures = sorted(p.name for p in (analysis_run / "figures").glob("*.png"))
    assert figures and sorted(p.name for p in (study_dir / "analysis" / "figures").glob("*.png")) == figures
    # the report links the copies beside it, so its links work without runs/ (a committed study)
    links = set(re.findall(r'href="([^"#:]+\.(?:csv|json))"', (study_dir / "report.html").read_text()))
    assert links and all(link.startswith("analysis/") and (study_dir / link).is_file() for link in links), links
    assert set(results["scoring"]) == {"generate"}


def test_rerun_skips_finished_runs(finished, smoke_params, capsys):
    code, study_dir = finished
    before = {p.name: json.loads((p / "status.json").read_text())["started"]
              for p in (study_dir / "runs").iterdir() if (p / "status.json").exists()}
    assert study.run_study(smoke_params, output_root=study_dir.parent) == 0
    after = {p.name: json.loads((p / "status.json").read_text())["started"] for p in (study_dir / "runs").iterdir()
             if (p / "status.json").exists()}
    assert before == after  # nothing recomputed


def test_a_failing_run_is_recorded_and_the_rest_complete(smoke_params, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    content = mini_content(smoke_params)
    content["models"]["students"].append({"name": "broken", "model": str(broken)})
    content["methods"] = ["sft"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    assert study.run_study(path, output_root=tmp_path / "out") == 1
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "out" / "mini" / "runs").glob("*/status.json")]
    failed = [s for s in statuses if s["state"] == "failed"]
    assert len(failed) == 1 and "broken" in failed[0]["label"] and failed[0]["error"]
    results = pd.read_csv(tmp_path / "out" / "mini" / "results.csv")
    assert "tiny-L1" in set(results["model"]) and "broken" not in set(results["model"])


def test_submitit_local_executor_gives_the_same_results(mini_finished, mini_params, tmp_path):
    assert study.run_study(mini_params, executor_name="submitit-local", output_root=tmp_path) == 0
    pd.testing.assert_frame_equal(comparable(pd.read_csv(tmp_path / "mini" / "results.csv")),
                                  comparable(pd.read_csv(mini_finished / "results.csv")))


def test_dry_run_prints_the_plan_and_writes_nothing(smoke_params, tmp_path, capsys):
    assert study.main(["run", str(smoke_params), "--dry-run", "--output-root", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "fine-tune teacher" in out and "eval" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["default", "paper_math", "paper_commonsense", "ablation_temperature",
                                  "ablation_noise", "ablation_expertise", "gpu_embedded"])
def test_every_planned_parameter_is_a_notebook_parameter(name):
    """papermill injects unknown names silently; a misspelt or undeclared one would be ignored by the notebook."""
    import papermill

    params = load_study(Path(__file__).resolve().parents[1] / "params" / f"{name}.yaml")
    declared = {}
    for run in study.plan(params):
        if run.notebook not in declared:
            declared[run.notebook] = set(papermill.inspect_notebook(str(study.NOTEBOOKS / run.notebook)))
        assert set(run.parameters) <= declared[run.notebook], (
            run.notebook, set(run.parameters) - declared[run.notebook])
