"""The report's blocks (tables, folds, banner, provenance, findings) and one rendered study-mode report."""

from __future__ import annotations

import hashlib
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from study_fixtures import write_run_status

from kd_utils import data, report

REPO = Path(__file__).resolve().parents[1]


def _results(n: int, accuracy: float = 50.0, domains=("math", "commonsense")) -> pd.DataFrame:
    """Results of 2 students (SFT and fkl) of one teacher on one task per domain."""
    rows = []
    for domain, task in zip(domains, ("gsm8k", "boolq")):
        for student in ("s-a", "s-b"):
            for method in ("sft", "fkl"):
                acc = 0.0 if domain == "commonsense" else accuracy
                rows.append({"study": "toy", "run_id": f"{student}-{method}", "role": "student", "model": student,
                             "teacher": "" if method == "sft" else "t", "method": method, "task": task,
                             "domain": domain, "n": n, "correct": n * acc / 100, "accuracy": acc})
    return pd.DataFrame(rows)


def _improvements(domains=("math", "commonsense")) -> pd.DataFrame:
    return pd.DataFrame([{"domain": d, "teacher": "t", "student": s, "method": "fkl", "task": "average",
                          "improvement": 1.0, "sft_accuracy": 50.0} for d in domains for s in ("s-a", "s-b")])


# ---- tables and folds ------------------------------------------------------------------------

def test_table_has_no_row_numbers_or_run_hashes_and_keeps_text_whole():
    note = "underpowered: " + "a long explanation that pandas would cut at fifty characters " * 3
    frame = pd.DataFrame({"run_id": ["eval-0123456789ab"], "sft_run_id": ["eval-ba9876543210"], "method": ["fkl"],
                          "note": [note], "pvalue": [0.012345678]})
    body = report.table(frame).data
    assert note.strip() in body
    assert "0123456789ab" not in body and "ba9876543210" not in body and "run_id" not in body
    assert "fkl (SeqKD)" in body and "0.01235" in body
    assert "<th>0</th>" not in body and "<tbody>\n    <tr>\n      <td>" in body  # rows start with data, no index
    indexed = report.table(frame.set_index("method")).data  # an index becomes a column, not row numbers
    assert "<th>method</th>" in indexed


def test_fold_links_the_csv_relative_to_the_report(tmp_path):
    csv = tmp_path / "runs" / "analysis-1" / "mcnemar.csv"
    frame = pd.DataFrame({"task": ["gsm8k", "svamp", "aqua"], "pvalue": [1.0, 1.0, 0.5]})
    body = report.fold(frame, "McNemar: 0 of 3 significant", csv, report_dir=tmp_path).data
    assert body.startswith("<details class=\"kd-fold\"><summary>McNemar: 0 of 3 significant")
    assert "3 rows" in body and "href=\"runs/analysis-1/mcnemar.csv\"" in body
    assert body.index("</summary>") < body.index("<table")  # the table is inside the fold, not in view
    assert "href=\"mcnemar.csv\"" in report.fold(frame, "s", csv).data  # default: the report beside the CSV


def test_notebook_to_html_title_from_the_first_heading_and_print_stylesheet(tmp_path):
    cell = new_code_cell("display(Markdown(...))")
    cell.outputs = [new_output("display_data", data={"text/markdown": "# kd-study report: study toy"})]
    nb = new_notebook(cells=[new_code_cell("x = 1"), cell, new_markdown_cell("# A later heading")])
    nbformat.write(nb, str(tmp_path / "nb.ipynb"))
    text = report.notebook_to_html(tmp_path / "nb.ipynb", tmp_path / "nb.html").read_text()
    assert "<title>kd-study report: study toy</title>" in text
    assert "@media print" in text and "table-layout: auto !important" in text
    assert "<title>Given</title>" in report.notebook_to_html(tmp_path / "nb.ipynb", tmp_path / "g.html",
                                                             title="Given").read_text()


# ---- banner -------------------------------------------------------------------------------------

def test_banner_for_a_tiny_study_gives_the_numbers_to_expect():
    design = report.study_design(_results(n=6), _improvements())
    assert list(design["pairs"]) == [2, 2] and list(design["zero_accuracies"]) == [0, 4]
    text = report.study_banner(design, power=[0.9], description="Embedded teacher.").data
    assert "A tiny study" in text and "Embedded teacher." in text and "n = 6" in text
    # at n = 6 and 50%: Wilson interval of 3/6 is 18.8%-81.2% (+-31); 2 sd of a difference of two
    # independent accuracies = 2 * 100 * sqrt(2 * 0.25 / 6) = 57.7; 80% power needs (1.96 + 0.84) * 28.9 = 81
    assert "&plusmn;31 points" in text and "&plusmn;58 points" in text and "about 81 points" in text
    assert "every student scores 0% on every commonsense task" in text
    assert "students with KD and SFT runs: 2; teacher-student pairs: 2 in math, 2 in commonsense" in text
    assert "power below" not in text  # the given power is adequate


def _all_paper_tasks(results: pd.DataFrame) -> pd.DataFrame:
    """The same runs on every paper task of their domain."""
    from kd_utils.tasks import tasks_for

    return pd.concat([results[results["domain"] == d].assign(task=t.id) for d in results["domain"].unique()
                      for t in tasks_for(d)], ignore_index=True)


def test_banner_from_low_power_alone_and_none_for_a_large_well_powered_study():
    design = report.study_design(_all_paper_tasks(_results(n=1000)), _improvements())
    assert report.study_banner(design, power=[0.85, 0.97]) is None
    text = report.study_banner(design, power=[0.85, 0.31]).data
    assert "Few units per test" in text and "1 of 2 primary tests have power below 0.8 (as low as 0.31)" in text
    # no power given: the H1 t-test over the 2 students of each domain, far below 0.8
    assert design["h1_power_medium_effect"].lt(0.8).all()
    assert "H1 t-tests over students (one per domain)" in report.study_banner(design).data


def test_banner_names_the_paper_tasks_a_domain_average_lacks():
    """A commonsense study without hellaswag (no test file offline): its average covers 7 of the paper's 8 tasks."""
    results = _all_paper_tasks(_results(n=1000))
    results = results[results["task"] != "hellaswag"]
    design = report.study_design(results, _improvements())
    assert list(design["paper_tasks_missing"]) == ["", "hellaswag"] and list(design["tasks"]) == [6, 7]
    text = report.study_banner(design, power=[0.85, 0.97]).data
    assert ("<b>Fewer tasks than the paper.</b> The commonsense average covers 7 of the paper's 8 commonsense "
            "tasks; missing: hellaswag. Compare it with the paper's numbers only over the same 7 tasks.") in text
    assert "math average" not in text and "Few units" not in text and "tiny study" not in text


# ---- provenance ---------------------------------------------------------------------------------

def test_stage_times_follow_the_dependencies_of_the_results(tmp_path):
    write_run_status(tmp_path, "teacher-1", "teacher", [], 50.0)
    write_run_status(tmp_path, "student-1", "student", ["teacher-1"], 30.0)
    write_run_status(tmp_path, "student-2", "student", ["teacher-1"], 10.0, state="failed")
    write_run_status(tmp_path, "eval-1", "eval", ["student-1"], 20.0)
    write_run_status(tmp_path, "eval-2", "eval", ["student-2", "teacher-1"], 5.0)
    write_run_status(tmp_path, "eval-stale", "eval", [], 999.0)  # an old run no result comes from
    rows = report.stage_times(tmp_path, ["eval-1", "eval-2"])
    assert rows == [{"stage": "teacher", "runs": 1, "done": 1, "seconds_total": 50.0, "seconds_max": 50.0},
                    {"stage": "student", "runs": 2, "done": 1, "seconds_total": 40.0, "seconds_max": 30.0},
                    {"stage": "eval", "runs": 2, "done": 2, "seconds_total": 25.0, "seconds_max": 20.0}]


def test_data_files_checksums_against_the_manifest(tmp_path):
    good = tmp_path / "results.csv"
    good.write_text("a,b\n1,2\n")
    real = data.resolve_data_dir() / "kd-paper-results" / "BLEU.csv"
    changed = tmp_path / "BLEU.csv"
    changed.write_text("not the paper's file\n")
    rows = report.data_files([("results.csv", good), ("kd-paper-results/BLEU.csv", changed),
                              ("gsm8k/test.jsonl", tmp_path / "missing.jsonl")])
    assert rows[0]["sha256"] == hashlib.sha256(b"a,b\n1,2\n").hexdigest() and rows[0]["bytes"] == 8
    assert rows[0]["manifest"] == "not listed" and rows[1]["manifest"] == "DIFFERS" and rows[2]["manifest"] == "missing"
    if real.is_file():
        assert report.data_files([("kd-paper-results/BLEU.csv", real)])[0]["manifest"] == "matches"


def test_project_version_is_this_checkout():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert report.project_version()["commit"] == head.stdout.strip()


def test_make_paper_takes_the_results_from_the_data_directory_lookup(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(report, "render_report", lambda nb, html, params: calls.append((nb, html, params)) or html)
    paper = tmp_path / "data" / "kd-paper-results"
    paper.mkdir(parents=True)
    for rel in data.MANIFEST:
        if rel.startswith("kd-paper-results/"):
            (tmp_path / "data" / rel).write_text("x\n")
    monkeypatch.setenv("KD_DATA_DIR", str(tmp_path / "data"))
    report.main(["paper", "--output-dir", str(tmp_path / "out")])
    notebook, html_path, params = calls[0]
    assert notebook == report.ANALYSIS_NOTEBOOK and html_path == tmp_path / "out" / "report.html"
    assert params == {"results_source": "paper", "paper_results_dir": str(paper), "output_dir": str(tmp_path / "out")}


# ---- findings -----------------------------------------------------------------------------------

NAN = float("nan")
# the inference issue's verdict schema (kd_utils.statistics.verdicts), with the paper-mode columns
VERDICTS = pd.DataFrame([
    {"domain": "math", "hypothesis": "H1_improvement_ttest", "claim": "KD improves the student over its SFT baseline",
     "test": "one-sided t-test over teacher-student pairs", "unit": "pairs", "n": 9,
     "estimate_label": "mean improvement (pp)", "estimate": 3.214, "ci_low": 1.05, "ci_high": 5.4,
     "pvalue": 0.0004, "pvalue_holm": 0.0012, "power": 0.93, "effect_of_interest": "a 3-point gain",
     "verdict": "supported", "reason": "p (Holm) = 0.0012 < 0.05",
     "paper_conclusion": "KD improves small students", "survives": "yes"},
    {"domain": "math", "hypothesis": "H2_teacher_performance", "claim": "the gain depends on the teacher's accuracy",
     "test": "Spearman over pairs, permutation p", "unit": "pairs", "n": 30, "estimate_label": "Spearman rho",
     "estimate": 0.05, "ci_low": -0.21, "ci_high": 0.25, "pvalue": 0.61, "pvalue_holm": 1.0, "power": 0.85,
     "effect_of_interest": "|rho| = 0.3", "verdict": "not supported",
     "reason": "p (Holm) = 1; the 95% interval excludes |rho| = 0.3",
     "paper_conclusion": "teacher accuracy barely predicts gains", "survives": True},
    {"domain": "commonsense", "hypothesis": "H3_student_size", "claim": "the gain depends on student size",
     "test": "", "unit": "students", "n": 2, "estimate_label": "", "estimate": NAN, "ci_low": NAN, "ci_high": NAN,
     "pvalue": NAN, "pvalue_holm": NAN, "power": NAN, "effect_of_interest": NAN, "verdict": "not testable",
     "reason": "not testable: 2 point(s) < 3", "paper_conclusion": "smaller students gain more", "survives": False},
])


def _blocks(body: str) -> list[str]:
    return [b.split("</div>")[0] for b in body.split("<div class=\"kd-finding ")[1:]]


def test_findings_block_renders_each_verdict_with_its_numbers():
    body = report.findings_block(VERDICTS).data
    supported, not_supported, not_testable = _blocks(body)
    assert supported.startswith("kd-supported")
    assert "<b>H1_improvement_ttest</b>: KD improves the student over its SFT baseline" in supported
    assert ("<span class=\"kd-verdict\">supported</span> "
            "<span class=\"kd-meta\">(p (Holm) = 0.0012 &lt; 0.05)" in supported)
    assert ("mean improvement (pp) +3.21 (interval +1.05 to +5.40); p &lt; 0.001 (Holm = 0.001), power 0.93 for a "
            "3-point gain; n = 9 pairs.") in supported
    assert "Test: one-sided t-test over teacher-student pairs." in supported
    assert "The paper: KD improves small students &mdash; <b>survives the valid procedure: yes</b>" in supported
    assert not_supported.startswith("kd-not-supported")
    assert "Spearman rho +0.05 (interval -0.21 to +0.25); p = 0.610 (Holm = 1.000), power 0.85 for |rho| = 0.3" \
        in not_supported
    assert "<b>survives the valid procedure</b>" in not_supported
    assert not_testable.startswith("kd-not-testable")
    assert "no estimate; p not computed; n = 2 students." in not_testable and "Test:" not in not_testable
    assert "<b>does not survive the valid procedure</b>" in not_testable
    assert body.index("<h3>math</h3>") < body.index("<h3>commonsense</h3>")
    can_say = body.split("What this study can and cannot say.</b>")[1]
    assert "It finds evidence for H1_improvement_ttest (math)." in can_say
    assert "or finds the opposite, in H2_teacher_performance (math)." in can_say
    assert "It cannot test H3_student_size (commonsense: n = 2 students)" in can_say
    assert "2 of 2 tests have power of at least 0.8." in can_say


def test_findings_block_with_the_required_columns_only_and_bad_tables():
    study = VERDICTS[list(report.VERDICT_COLUMNS)]
    body = report.findings_block(study).data
    assert "The paper" not in body and "Test:" not in body and "kd-meta" not in body
    assert "estimate +3.21 (interval +1.05 to +5.40); p &lt; 0.001, power 0.93; n = 9." in body
    with pytest.raises(ValueError, match="lacks column.*power"):
        report.findings_block(study.drop(columns="power"))
    with pytest.raises(ValueError, match="unknown verdict.*'proven'"):
        report.findings_block(study.assign(verdict="proven"))


# ---- a rendered report ----------------------------------------------------------------------------

class _VisibleTables(HTMLParser):
    """Row counts of the tables outside every <details>, and the hrefs of the page."""

    def __init__(self):
        super().__init__()
        self.folded, self.tables, self.rows, self.hrefs = 0, [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.folded += 1
        elif tag == "table" and not self.folded:
            self.rows = 0
        elif tag == "tr" and self.rows is not None:
            self.rows += 1
        elif tag == "a":
            self.hrefs.append(dict(attrs).get("href"))

    def handle_endtag(self, tag):
        if tag == "details":
            self.folded -= 1
        elif tag == "table" and self.rows is not None:
            self.tables.append(self.rows - 1)  # less the header row
            self.rows = None


@pytest.mark.slow
def test_study_report_opens_with_title_banner_and_provenance(study_report):
    _, text = study_report
    title = "kd-study report: study synth"
    assert f"<title>{title}</title>" in text
    body = text[text.index("<body"):]
    assert body.index(title) < body.index("<div class=\"kd-banner\">") < body.index("<div class=\"kd-findings\">") \
        < body.index("<details class=\"kd-provenance\"") < body.index("About this analysis")
    assert "A tiny study" in body and "A synthetic study." in body and "n = 30" in body
    provenance = body.split("<details class=\"kd-provenance\"")[1]
    assert "commit" in provenance and "sha256" in provenance and "Wall time of the runs" in provenance
    assert "Study parameters (params.resolved.json)" in provenance


@pytest.mark.slow
def test_study_report_tables_in_view_are_short_and_links_resolve(study_report):
    html_path, text = study_report
    parser = _VisibleTables()
    parser.feed(text)
    assert parser.tables and max(parser.tables) <= 40, parser.tables
    csv_links = [h for h in parser.hrefs if h and h.endswith((".csv", ".json"))]
    assert {"analysis/improvements.csv", "analysis/mcnemar.csv", "analysis/fidelity.csv",
            "analysis/provenance.json", "analysis/study_design.csv"} <= set(csv_links)
    for href in csv_links:
        assert (html_path.parent / href).is_file(), href
    assert "<th>run_id</th>" not in text and "<th>teacher_run_id</th>" not in text
    provenance = json.loads((html_path.parent / "analysis" / "provenance.json").read_text())
    assert [s["stage"] for s in provenance["stages"]] == ["eval"] and provenance["study"] == "synth"
    assert {f["file"] for f in provenance["data_files"]} >= {"results.csv", "models.csv", "gsm8k/train.jsonl"}


def test_provenance_names_each_training_mix(tmp_path):
    """The study's mixes (a math-only study's resolved params leave the default mix out) with what each holds."""
    (tmp_path / "params.resolved.json").write_text(json.dumps({
        "study": "toy", "domains": ["math", "commonsense"],
        "training": {"teacher": {"include_mawps": True}, "student": {"include_mawps": False, "mix": "design"}}}))
    prov = report.provenance({}, _results(n=6), study_dir=tmp_path)
    assert [(m["domain"], m["role"], m["mix"]) for m in prov["training_mixes"]] == [
        ("math", "teacher", "llm_adapters"), ("math", "student", "design"),
        ("commonsense", "teacher", "llm_adapters"), ("commonsense", "student", "design")]
    assert prov["training_mixes"][0]["what"].startswith("GSM8K train + MAWPS train, decontaminated")
    assert "HellaSwag's 4,056 are missing" in prov["training_mixes"][2]["what"]
    text = report.provenance_html(prov).data
    assert ("<b>Training data</b> (student, commonsense): mix <code>design</code>, boolq, ARC-e, ARC-c and OBQA "
            "train, every row, decontaminated (not the authors&#x27; data).") in text
    files = {f["file"] for f in prov["data_files"]}
    if data.resolve_data_dir().joinpath("siqa", "train.jsonl").is_file():  # the rebuilt mix's upstream files
        assert {"siqa/train.jsonl", "siqa/train-labels.lst", "winogrande/train_xl.jsonl"} <= files
