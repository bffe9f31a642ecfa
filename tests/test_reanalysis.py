"""A committed study re-analysed from its small files (results.csv, models.csv, correctness.csv.gz and the
analysis parameters in analysis/provenance.json) reproduces the report's tables: every committed study
under outputs/, and a synthetic log-likelihood-scored study here."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import papermill as pm
import pytest

from kd_utils.analysis import reanalyse_study
from kd_utils.predictions import CORRECTNESS_FILE, export_correctness, read_correctness

REPO = Path(__file__).resolve().parents[1]
COMMITTED = [d for d in sorted((REPO / "outputs").glob("*/"))
             if (d / "results.csv").is_file() and (d / CORRECTNESS_FILE).is_file() and (d / "analysis").is_dir()]


def assert_reproduces(study_dir: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Every CSV the analysis wrote under ``study_dir/analysis`` equals the re-analysed table (read back
    from CSV alike, floats to 1e-9 relative: the mixed model's optimiser may differ in the last digits)."""
    committed = sorted((study_dir / "analysis").glob("*.csv"))
    assert committed, f"no analysis tables in {study_dir / 'analysis'}"
    for path in committed:
        assert path.name in tables, f"{path} is not among the re-analysed tables ({', '.join(tables)})"
        expected = pd.read_csv(path)
        got = pd.read_csv(io.StringIO(tables[path.name].to_csv(index=False)))
        pdt.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-12, obj=str(path))


@pytest.mark.parametrize("study_dir", COMMITTED, ids=[d.name for d in COMMITTED])
def test_committed_study_reproduces_its_report_tables(study_dir):
    assert_reproduces(study_dir, reanalyse_study(study_dir))


def _loglik_like_study(root: Path) -> Path:
    """The synthetic study (tests/study_fixtures.py) with no generated text, as log-likelihood scoring leaves
    its predictions: output null."""
    from study_fixtures import write_study

    write_study(root)
    for path in (root / "runs").rglob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "output": None}) + "\n" for r in records))
    return root


def test_correctness_export_round_trip(tmp_path):
    study = _loglik_like_study(tmp_path / "study")
    results = pd.read_csv(study / "results.csv")
    table = export_correctness(study / "runs", results["run_id"], study / CORRECTNESS_FILE)
    assert len(table) == results["n"].sum()
    assert (study / CORRECTNESS_FILE).read_bytes() == (  # byte-reproducible (no gzip timestamp)
        export_correctness(study / "runs", results["run_id"], tmp_path / "again.csv.gz") is not None
        and (tmp_path / "again.csv.gz").read_bytes())
    store = read_correctness(study / CORRECTNESS_FILE)
    for run_id, task in results[["run_id", "task"]].itertuples(index=False):
        original = pd.read_json(study / "runs" / run_id / "predictions" / f"{task}.jsonl", lines=True,
                                dtype={"id": str, "prediction": str})
        got = store.get(run_id, task)
        assert got["id"].tolist() == original["id"].tolist()
        assert got["correct"].tolist() == original["correct"].tolist()
        assert [str(p) for p in got["prediction"]] == [str(p) for p in original["prediction"]]
    assert store.get("no-such-run", "boolq") is None


@pytest.mark.slow
def test_a_loglik_study_reproduces_from_its_export_through_the_notebook(tmp_path):
    """The analysis notebook on the export alone (runs/ gone, as in a fresh clone) writes the same tables
    as the analysis from the per-example JSONL files; the re-analysis of the export reproduces them, the
    pre-registered primary family (which decides Holm's adjustment and the verdicts) included."""
    study = _loglik_like_study(tmp_path / "study")
    results = pd.read_csv(study / "results.csv")
    export_correctness(study / "runs", results["run_id"], study / CORRECTNESS_FILE)
    runs = shutil.move(study / "runs", tmp_path / "runs")
    pm.execute_notebook(str(REPO / "notebooks" / "analysis.ipynb"), str(tmp_path / "analysis.ipynb"),
                        parameters={"results_source": "study", "results_path": str(study / "results.csv"),
                                    "output_dir": str(study / "analysis"), "n_bootstrap": 100, "n_permutations": 199,
                                    "bootstrap_seed": 3, "embeddings": False,
                                    "primary_hypotheses": ["H1_improvement_ttest", "H3_student_size"]},
                        cwd=str(REPO), progress_bar=False, kernel_name="python3")
    used = json.loads((study / "analysis" / "provenance.json").read_text())["analysis_parameters"]
    assert used["n_permutations"] == 199 and used["primary_hypotheses"] == ["H1_improvement_ttest", "H3_student_size"]
    fidelity = pd.read_csv(study / "analysis" / "fidelity.csv")
    assert fidelity["agreement"].notna().all() and fidelity["bleu"].isna().all()  # no text, no BLEU
    assert len(pd.read_csv(study / "analysis" / "mcnemar.csv")) > 0
    assert_reproduces(study, reanalyse_study(study, predictions=runs))  # from the JSONL predictions
    assert_reproduces(study, reanalyse_study(study))  # from the export
