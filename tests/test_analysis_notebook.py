"""End-to-end: notebooks/analysis.ipynb under papermill, rendered to HTML, in paper and study mode."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from study_fixtures import write_study

from kd_utils import statistics as st
from kd_utils.report import render_report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
PAPER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kd-paper-results"

pytestmark = pytest.mark.slow


def check_report(html: Path, figures: list[str], figures_dir: Path) -> None:
    text = html.read_text()
    assert "<script src=" not in text and "<link rel=\"stylesheet\" href=\"http" not in text  # self-contained
    assert text.count("src=\"data:image/png;base64,") >= len(figures)
    assert "import kd_utils" not in text and "from kd_utils" not in text  # code cells hidden
    for name in figures:
        for ext in ("png", "pdf"):
            assert (figures_dir / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"


def test_committed_notebook_has_parameters_and_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("results_source", "results_path", "paper_results_dir", "output_dir", "runs_dir"):
        assert re.search(rf"^{name} = ", tagged[0].source, flags=re.M), name
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason=f"paper results not found at {PAPER_DIR}")
def test_paper_mode_notebook(tmp_path):
    out = tmp_path / "paper"
    html = render_report(NOTEBOOK, out / "report.html",
                         {"results_source": "paper", "paper_results_dir": str(PAPER_DIR), "output_dir": str(out)})
    written = pd.read_csv(out / "hypothesis_tests.csv")
    # every statistic the report shows: the published ones, Holm, the note and the power
    assert list(written.columns) == list(st.TEST_COLUMNS) + ["note", "power", "pvalue_holm"]
    pd.testing.assert_frame_equal(written[list(st.TEST_COLUMNS)], st.paper_hypothesis_tests(PAPER_DIR),
                                  check_exact=False, rtol=1e-12)
    tested = written["pvalue"].notna()
    assert (written.loc[tested, "pvalue_holm"] >= written.loc[tested, "pvalue"] - 1e-15).all()
    assert written.loc[tested, "power"].between(0, 1).all()
    assert len(written) == 352
    # the re-analysis goes to files of its own, with the published statistic beside ours
    reanalysis = pd.read_csv(out / "hypothesis_tests_reanalysis.csv")
    assert {"published_statistic", "published_pvalue", "significant_published", "significant_reanalysis"} <= set(
        reanalysis.columns)
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) == 16 and verdicts["survives"].notna().all()
    assert set(verdicts["verdict"]) <= {"supported", "not supported", "underpowered", "inconclusive", "not testable"}
    text = html.read_text()
    assert text.index("<div class=\"kd-findings\">") < text.index("<details class=\"kd-provenance\"") \
        < text.index("About this analysis")
    assert "survives the valid procedure: " in text and "What this study can and cannot say" in text
    check_report(html, ["improvement_vs_size", "task_differences_math", "task_differences_commonsense",
                        "ablation_temperature", "ablation_expertise", "agreement_vs_improvement",
                        "bleu_vs_improvement"], out / "figures")
    assert "H1_improvement_ttest" in html.read_text() and "SVAMP" in html.read_text()  # paper layout table


def test_study_mode_notebook(study_report):
    # the synthetic study's report (tests/conftest.py), without MiniLM: test_fidelity exercises it, and on CPU
    # it would dominate this test's time
    html, _ = study_report
    results, out = html.parent / "results.csv", html.parent / "analysis"
    tests = pd.read_csv(out / "hypothesis_tests.csv")
    assert list(tests.columns) == list(st.STUDY_TEST_COLUMNS)
    testable = tests[tests["pvalue"].notna()]
    assert (testable["note"].fillna("").str.startswith("underpowered") == ~(testable["power"] >= 0.8)).all()
    assert {"H4_agreement", "H4_kd_vs_sft", "H5_fidelity"} <= set(tests["hypothesis"])
    assert set(tests.loc[tests["hypothesis"] == "H5_fidelity", "domain"]) == {"math"}  # BLEU: math, as the paper
    # a single teacher: H2 is reported as not testable, not an error
    h2 = tests[tests["hypothesis"] == "H2_teacher_performance"]
    assert h2["statistic"].isna().all() and h2["note"].str.startswith("not testable").all()
    improvements = pd.read_csv(out / "improvements.csv")
    assert improvements["ci_low"].notna().all() and improvements["student_size"].notna().all()
    assert improvements["temperature"].isna().all()  # the mean over temperatures: nothing selected
    assert improvements["improvement_selected"].notna().all()  # the honest best-temperature estimate
    results_table = st.load_results(results)
    n_runs = (st.main_pairs(results_table)["task"] != "average").sum()
    assert len(pd.read_csv(out / "mcnemar.csv")) == len(pd.read_csv(out / "mcnemar_agreement.csv")) == n_runs
    mixed = pd.read_csv(out / "mixed_effects.csv")  # 3 pairs: refused, with the reason
    assert mixed["note"].iloc[0].startswith("not testable: 3 student(s), 3 pair(s)")
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) == 16 and set(verdicts["domain"]) == {"math", "commonsense"}
    assert len(pd.read_csv(out / "ablation_noise_sigma.csv")) > 0
    check_report(html, ["improvement_vs_size", "task_differences_math", "ablation_temperature",
                        "ablation_noise_sigma", "ablation_expertise", "agreement_vs_improvement",
                        "bleu_vs_improvement"], out / "figures")


def test_study_without_kd_students_renders_an_empty_analysis(tmp_path):
    results = write_study(tmp_path / "study")
    table = pd.read_csv(results)
    table[~table["method"].isin(["fkl", "rkl", "gkd"])].to_csv(results, index=False)
    out = tmp_path / "analysis"
    html = render_report(NOTEBOOK, out / "report.html",
                         {"results_source": "study", "results_path": str(results), "output_dir": str(out),
                          "n_bootstrap": 50, "embeddings": False})
    assert len(pd.read_csv(out / "improvements.csv")) == 0
    assert len(pd.read_csv(out / "hypothesis_tests.csv")) == 0
    assert (pd.read_csv(out / "verdicts.csv")["verdict"] == "not testable").all()
    assert "No KD student has an SFT run" in html.read_text()
