"""Write notebooks/analysis.ipynb (run: python notebooks/build_analysis_notebook.py).

The committed .ipynb is the artefact; this script only keeps its cells readable in
review. Cells stay thin: every computation lives in kd_utils.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("parameters", """# The analysis of a KD study (study mode) or of the paper's published results (paper mode); the
# rendered report opens with the study's title, provenance and, for a small study, a banner.
results_source = "study"  # "study" or "paper"
results_path = "outputs/default/results.csv"  # study mode
paper_results_dir = "../shared/data/kd-paper-results"  # paper mode
output_dir = "outputs/default/analysis"
runs_dir = None  # per-example predictions; default: <results dir>/runs
models_path = None  # models.csv (model, n_params); default: <results dir>/models.csv
n_bootstrap = 2000
bootstrap_seed = 0
embeddings = True  # embedding similarity with the packaged MiniLM (study mode, needs predictions)
report_dir = None  # where the HTML report is read from, for its links to the CSVs; default: output_dir"""),
    ("code", """import json
import os
import warnings
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"  # progress bars (model loading) would end up in the report
warnings.filterwarnings("ignore", message="IProgress not found")

import pandas as pd
from IPython.display import Markdown, display

from kd_utils import fidelity as fd
from kd_utils import plots, report
from kd_utils import statistics as st
from kd_utils.io import write_atomic

if Path.cwd().name == "notebooks":  # opened in JupyterLab: resolve paths against the repository root like papermill
    os.chdir(Path.cwd().parent)
output_dir = Path(output_dir)
figures_dir = output_dir / "figures"
output_dir.mkdir(parents=True, exist_ok=True)
report_dir = Path(report_dir) if report_dir else output_dir
pd.set_option("display.precision", 4)
pd.set_option("display.max_rows", 400)
pd.set_option("display.max_colwidth", None)  # notes in full
if results_source not in ("paper", "study"):
    raise ValueError(f"results_source must be 'paper' or 'study', got {results_source!r}")"""),
    ("code", """if results_source == "paper":
    results, improvements = st.paper_improvements(paper_results_dir)
    fidelity = pd.DataFrame()
else:
    results = st.load_results(results_path)
    study_dir = Path(results_path).parent
    runs_dir = Path(runs_dir) if runs_dir else study_dir / "runs"
    models_csv = Path(models_path) if models_path else study_dir / "models.csv"
    improvements = st.improvement_table(results, st.load_model_sizes(models_csv) if models_csv.is_file() else None)
    predictions = runs_dir if runs_dir.is_dir() else None
    embedder = fd.load_embedding_model() if embeddings and predictions else None
    fidelity = fd.fidelity_table(results, predictions, embedder) if predictions else pd.DataFrame()
    if len(fidelity):
        improvements = st.attach_fidelity(improvements, fidelity)
    improvements = st.improvement_intervals(results, improvements, predictions, n_bootstrap, seed=bootstrap_seed)
improvements.to_csv(output_dir / "improvements.csv", index=False)"""),
    ("code", """display(Markdown(f"# {report.report_title(results_source, results)}"))
study_mode = results_source == "study"
provenance = report.provenance(
    {"results_source": results_source, "results_path": results_path, "paper_results_dir": paper_results_dir,
     "output_dir": output_dir, "runs_dir": runs_dir, "models_path": models_path, "n_bootstrap": n_bootstrap,
     "bootstrap_seed": bootstrap_seed, "embeddings": embeddings, "report_dir": report_dir},
    results, study_dir=study_dir if study_mode else None, runs_dir=runs_dir if study_mode else None,
    paper_dir=None if study_mode else paper_results_dir,
    model_sizes=st.load_model_sizes(models_csv) if study_mode and models_csv.is_file() else None)
write_atomic(output_dir / "provenance.json", json.dumps(provenance, indent=1, default=str))
design = report.study_design(results, improvements)
design.to_csv(output_dir / "study_design.csv", index=False)
banner = report.study_banner(design, description=provenance["study_parameters"].get("description", ""),
                             design_href=report.link(output_dir / "study_design.csv", report_dir))
if banner is not None:
    display(banner)
display(report.provenance_html(provenance, report.link(output_dir / "provenance.json", report_dir)))
display(Markdown(f"{results['run_id'].nunique()} runs, {len(improvements)} (teacher, student, method, task) rows."))"""),
    ("md", """## About this analysis
Reproduces the hypothesis tests of Ramesh, Sengupta & Chakraborty, *On the Generalization
vs Fidelity Paradox in Knowledge Distillation* (ACL Findings 2025), either from the
paper's published per-run results (`results_source="paper"`) or from our own study
(`results_source="study"`, an `outputs/<study>/results.csv`).

*Improvement* = KD accuracy at the best temperature (chosen per task) minus the
student's SFT accuracy, in percentage points. Method ids are shown with the paper's
names: fkl (SeqKD), rkl (RevKD), gkd (GKD); seqkd is sequence-level KD (Kim & Rush).
Relative paths resolve against the repository root (where `kd_utils.report.render_report`
runs the kernel, and where this notebook moves when opened from `notebooks/`).

Inputs. Paper mode: the paper's result files (`student` runs, task-unaware-teacher runs kept
only for the expertise ablation), agreement from `EM1*.csv` and BLEU from `BLEU.csv`.
Study mode: our results table; student sizes from `models.csv` when present, else
parsed from model names; fidelity from per-example predictions when present. Every table
of this report is also a CSV file beside it (linked from each folded table)."""),
    ("md", """## Improvements
Average over tasks per teacher -> student pair, in percentage points, a column per method;
in study mode with the bootstrap 95% interval over test examples in brackets (paired when
predictions exist; it does not cover seed-to-seed training variation). Every task is in the
folded table and in `improvements.csv`."""),
    ("code", """if len(improvements) == 0:
    display(Markdown("**No KD student has an SFT run of the same student to compare with: "
                     "every improvement-based section below is empty.**"))
else:
    display(report.table(report.improvement_summary(improvements)))
    display(report.fold(improvements[improvements["task"] != "average"].dropna(axis=1, how="all"),
                        "Every task: KD and SFT accuracy, improvement, teacher accuracy, student size",
                        output_dir / "improvements.csv", report_dir))"""),
    ("md", """## Hypothesis tests
H1: one-sided one-sample t-test of improvement > 0 and one-way ANOVA across methods;
H2: Spearman with the teacher's accuracy; H3: with student size and student SFT
accuracy; H4: with teacher-student answer agreement; H5: with rationale BLEU.
Tests with fewer than 3 points, or on constant input, are reported as not testable
(NaN). Holm-adjusted p-values are across the tasks of each (domain, hypothesis,
method), `average` included. In study mode Spearman tests also get a permutation
p-value (exact for up to 7 points): scipy's p-value is asymptotic and far too small
for the handful of points a small study has. `power` is each test's power to detect a medium
effect (Cohen's d = 0.5, f = 0.25, rho = 0.3) at alpha = 0.05; tests below 0.8 are marked
**underpowered** in `note`: their non-significant results say little."""),
    ("code", """tests = st.holm_adjust(st.hypothesis_tests(improvements, permutation=results_source == "study"))
extra = [] if results_source == "paper" else ["pvalue_holm", "pvalue_permutation", "note", "power"]
tests[list(st.TEST_COLUMNS) + extra].to_csv(output_dir / "hypothesis_tests.csv", index=False)
display(tests[tests["task"] == "average"].set_index(["domain", "hypothesis", "method", "task"]))"""),
    ("md", """### In the paper's table layout
Cells are `statistic (p)`: t for H1 t-tests, F for the ANOVA, Spearman rho otherwise."""),
    ("code", """for domain in tests["domain"].unique():
    display(Markdown(f"**{domain}**"))
    display(st.paper_table(tests, domain))"""),
    ("md", """## Mixed-effects model
improvement ~ log(student size in B) + method, random intercept per task (REML),
fitted per domain on task rows."""),
    ("code", """mixed = st.mixed_effects(improvements)
mixed.to_csv(output_dir / "mixed_effects.csv", index=False)
display(mixed)"""),
    ("md", """## Per-student McNemar tests (study mode)
Exact McNemar test of KD vs SFT on the same test examples, per task at the best
temperature; `kd_only` / `sft_only` count examples only KD / only SFT gets right.
Holm-adjusted across tasks per (teacher, student, method, seed)."""),
    ("code", """if results_source == "study" and predictions:
    mcnemar = st.mcnemar_tests(results, improvements, predictions)
    mcnemar.to_csv(output_dir / "mcnemar.csv", index=False)
    display(report.fold(mcnemar, f"McNemar tests per task: {(mcnemar['pvalue_holm'] < 0.05).sum()} of {len(mcnemar)} "
                        "with Holm-adjusted p < 0.05", output_dir / "mcnemar.csv", report_dir))
else:
    display(Markdown("No per-example predictions, so no McNemar tests."))"""),
    ("md", """## Figures"""),
    ("code", """if improvements["student_size"].notna().any():
    plots.improvement_vs_size(improvements, figures_dir)
else:
    display(Markdown("No student sizes (models.csv or sizes in model names): H3 size and this figure are skipped."))
for domain in improvements["domain"].unique():
    plots.task_differences(improvements, domain, figures_dir)"""),
    ("md", """## Ablations
Temperature (task-expert teacher, no noise), Gaussian noise on the teacher's logits
(sigma 0 is the baseline) and teacher expertise (task expert vs task-unaware), each
over the configurations where that factor varies."""),
    ("code", """for factor in st.ABLATION_FACTORS:
    table = st.ablation_table(results, factor)
    table.to_csv(output_dir / f"ablation_{factor}.csv", index=False)
    if len(table):
        display(Markdown(f"### {factor}"))
        display(report.fold(table[table["task"] == "average"] if (table["task"] == "average").any() else table,
                            f"{factor} ablation: accuracy and improvement per configuration, average over tasks",
                            output_dir / f"ablation_{factor}.csv", report_dir))
        plots.ablation_curve(table, factor, figures_dir)
    else:
        display(Markdown(f"### {factor}\\nNo runs vary {factor}."))"""),
    ("md", """## Fidelity
Agreement = how often the student's extracted answer equals the teacher's (all
examples, and examples the teacher gets right); BLEU = corpus BLEU of student against
teacher rationales; embedding similarity = mean cosine of MiniLM sentence embeddings.
The paper reports Spearman rho ~ 0.97 between BLEU and embedding similarity."""),
    ("code", """if len(fidelity):
    fidelity.to_csv(output_dir / "fidelity.csv", index=False)
    display(report.fold(fidelity, "Agreement, BLEU and embedding similarity per student run and task",
                        output_dir / "fidelity.csv", report_dir))
if len(fidelity) and fidelity["embedding_similarity"].notna().any():
    display(Markdown("BLEU vs embedding similarity, Spearman over (run, task) rows:"))
    display(fd.bleu_embedding_agreement(fidelity))
    plots.scatter(fidelity, "bleu", "embedding_similarity", "bleu_vs_embedding", figures_dir)
for metric in ("agreement", "bleu"):
    if metric in improvements and improvements[metric].notna().any():
        plots.scatter(improvements, metric, "improvement", f"{metric}_vs_improvement", figures_dir)"""),
]


def build() -> nbformat.NotebookNode:
    """The analysis notebook, without outputs."""
    cells = []
    for kind, source in CELLS:
        if kind == "md":
            cells.append(new_markdown_cell(source))
        else:
            cell = new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("analysis.ipynb")
    nbformat.write(build(), str(path))
    print(f"wrote {path}")
