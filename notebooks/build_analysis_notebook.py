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
correctness_path = None  # compact per-example export, read when runs_dir is absent; default: <results dir>/correctness.csv.gz
models_path = None  # models.csv (model, n_params); default: <results dir>/models.csv
n_bootstrap = 2000
bootstrap_seed = 0  # also seeds the selection/estimation split and Monte Carlo permutations
n_permutations = 9999
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
from kd_utils.analysis import study_analysis
from kd_utils.io import write_atomic
from kd_utils.predictions import CORRECTNESS_FILE, read_correctness
from kd_utils.statistics.simulation import read_validity

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
    results, improvements = st.paper_improvements(paper_results_dir)  # best temperature: as published
    published = st.holm_adjust(st.hypothesis_tests(improvements))
    published.to_csv(output_dir / "hypothesis_tests.csv", index=False)  # with pvalue_holm, note, power
    reanalysed, tests, verdicts = st.paper_reanalysis(paper_results_dir, n_permutations, bootstrap_seed)
    tests.to_csv(output_dir / "hypothesis_tests_reanalysis.csv", index=False)
    reanalysed.to_csv(output_dir / "improvements_reanalysis.csv", index=False)
    fidelity = mcnemar = agreement_mcnemar = pd.DataFrame()
    mixed = st.mixed_effects(reanalysed)
else:
    results = st.load_results(results_path)
    study_dir = Path(results_path).parent
    runs_dir = Path(runs_dir) if runs_dir else study_dir / "runs"
    models_csv = Path(models_path) if models_path else study_dir / "models.csv"
    correctness = Path(correctness_path) if correctness_path else study_dir / CORRECTNESS_FILE
    predictions = runs_dir if runs_dir.is_dir() else read_correctness(correctness) if correctness.is_file() else None
    embedder = fd.load_embedding_model() if embeddings and predictions else None
    analysis = study_analysis(results, st.load_model_sizes(models_csv) if models_csv.is_file() else None,
                              predictions, embedder, n_bootstrap=n_bootstrap, n_permutations=n_permutations,
                              seed=bootstrap_seed)
    improvements, tests, verdicts, mixed = analysis.improvements, analysis.tests, analysis.verdicts, analysis.mixed
    fidelity, mcnemar, agreement_mcnemar = analysis.fidelity, analysis.mcnemar, analysis.agreement_mcnemar
    tests.to_csv(output_dir / "hypothesis_tests.csv", index=False)
improvements.to_csv(output_dir / "improvements.csv", index=False)
verdicts.to_csv(output_dir / "verdicts.csv", index=False)"""),
    ("code", """display(Markdown(f"# {report.report_title(results_source, results)}"))
study_mode = results_source == "study"
provenance = report.provenance(
    {"results_source": results_source, "results_path": results_path, "paper_results_dir": paper_results_dir,
     "output_dir": output_dir, "runs_dir": runs_dir, "correctness_path": correctness_path, "models_path": models_path,
     "n_bootstrap": n_bootstrap, "n_permutations": n_permutations, "bootstrap_seed": bootstrap_seed, "embeddings": embeddings, "report_dir": report_dir},
    results, study_dir=study_dir if study_mode else None, runs_dir=runs_dir if study_mode else None,
    paper_dir=None if study_mode else paper_results_dir,
    model_sizes=st.load_model_sizes(models_csv) if study_mode and models_csv.is_file() else None)
write_atomic(output_dir / "provenance.json", json.dumps(provenance, indent=1, default=str))
design = report.study_design(results, improvements)
design.to_csv(output_dir / "study_design.csv", index=False)
banner = report.study_banner(design, power=verdicts["power"], description=provenance["study_parameters"].get("description", ""),
                             design_href=report.link(output_dir / "study_design.csv", report_dir))
if banner is not None:
    display(banner)"""),
    ("md", """## Findings
One verdict per domain and hypothesis, from the primary test (the average over the
domain's tasks, methods pooled) of the valid procedure, Holm-adjusted across the
domain's hypotheses: **supported** (significant in the claimed direction), **not
supported** (not significant and the 95% interval rules out the effect of interest: a
3-point gain, |rho| = 0.3), **underpowered** (not significant, power below 0.8),
**inconclusive** (not significant although powered) or **not testable**. In paper mode
the paper's own conclusion and whether it survives stand beside ours (`verdicts.csv`)."""),
    ("code", """finding_columns = ["domain", "hypothesis", "n", "estimate", "ci_low", "ci_high", "pvalue", "pvalue_holm", "power",
                   "verdict"] + (["paper_conclusion", "survives"] if results_source == "paper" else [])
display(report.findings_block(verdicts))
display(report.table(verdicts[finding_columns]))"""),
    ("md", """## Provenance"""),
    ("code", """display(report.provenance_html(provenance, report.link(output_dir / "provenance.json", report_dir)))
display(Markdown(f"{results['run_id'].nunique()} runs, {len(improvements)} (teacher, student, method, task) rows."))"""),
    ("md", """## About this analysis
Reproduces the hypothesis tests of Ramesh, Sengupta & Chakraborty, *On the Generalization
vs Fidelity Paradox in Knowledge Distillation* (ACL Findings 2025), either from the
paper's published per-run results (`results_source="paper"`) or from our own study
(`results_source="study"`, an `outputs/<study>/results.csv`).

*Improvement* = KD accuracy minus the student's SFT accuracy, in percentage points. In
study mode it is the mean over the temperatures (nothing is chosen on the test data), and
tests count independent units (students, or pairs within students); paper mode shows
the paper's statistics as published (temperature chosen on the test set) and, beside
them, the same hypotheses re-analysed by the valid procedure. Method ids are shown with the paper's
names: fkl (SeqKD), rkl (RevKD), gkd (GKD); seqkd is sequence-level KD (Kim & Rush).
Relative paths resolve against the repository root (where `kd_utils.report.render_report`
runs the kernel, and where this notebook moves when opened from `notebooks/`).

Inputs. Paper mode: the paper's result files (`student` runs, task-unaware-teacher runs kept
only for the expertise ablation), agreement from `EM1*.csv` and BLEU from `BLEU.csv`.
Study mode: our results table; student sizes from `models.csv` when present, else
parsed from model names; fidelity from per-example predictions when present. Every table
of this report is also a CSV file beside it (linked from each folded table)."""),
    ("md", """### How far these tests can be trusted
Whole-pipeline null simulation (`benchmarks/null_simulation.py`): synthetic studies of
the issue's design (3 teachers x 3 students per domain, fkl / rkl / gkd at 3
temperatures sharing one SFT run per student, 13 tasks of 300 binomial examples) put
through this same analysis. *type I*: how often a test rejected at alpha = 0.05 when
nothing helps (for the intervals: how often a 95% interval missed the truth); *power*:
how often it rejected with a true 3-point gain of every KD run (method tests: of one
method). The rows "as published" are the paper's procedure on the same studies."""),
    ("code", """validity = read_validity()
display(validity if len(validity) else Markdown("No simulation results found (run benchmarks/null_simulation.py)."))"""),
    ("md", """## Improvements
Average over tasks per teacher -> student pair, in percentage points, a column per method
(every task is in the folded table and in `improvements.csv`). In study mode `improvement` is the mean over temperatures with
bootstrap 95% intervals over test examples (`ci_low`/`ci_high`, paired when
predictions exist; they do not cover seed-to-seed training variation);
`improvement_selected` is the honest "best temperature" estimate (chosen on half A of
every test set, measured on half B; needs predictions). Paper mode: the paper's
best-temperature improvements, as published."""),
    ("code", """if len(improvements) == 0:
    display(Markdown("**No KD student has an SFT run of the same student to compare with: "
                     "every improvement-based section below is empty.**"))
else:
    display(report.table(report.improvement_summary(improvements)))
    display(report.fold(improvements[improvements["task"] != "average"].dropna(axis=1, how="all"),
                        "Every task: KD and SFT accuracy, improvement, teacher accuracy, student size",
                        output_dir / "improvements.csv", report_dir))"""),
    ("md", """## Hypothesis tests
Valid procedure (study mode; the paper's re-analysis): H1 one-sided t-test over
students (each student's pairs share its one SFT run) and a Friedman test of the
methods with pairs as blocks; H2 / H4 / H5 Spearman of improvement with the teacher's
accuracy / agreement / rationale BLEU, ranked within students, permutation p-values
permuting pairs within students; H3 Spearman over students with size and with SFT
accuracy (measured on half A of every test set, the improvement on half B, so SFT's
own noise makes no slope); H4 in study mode uses error consistency (agreement beyond
what the two accuracies imply), the paper's files hold raw agreement only;
H4_kd_vs_sft tests whether KD raises agreement over SFT. `pvalue` is the p-value
everything uses, `pvalue_holm` adjusts it across tasks; `power` is for the effect of
interest. Average-task rows below, every row in the CSV."""),
    ("code", """average = tests[tests["task"] == "average"].dropna(axis=1, how="all")
test_csv = output_dir / ("hypothesis_tests.csv" if results_source == "study" else "hypothesis_tests_reanalysis.csv")
if len(average) == 0:
    display(Markdown("No tests: no improvements to test."))
elif len(average) <= 40:
    display(report.table(average))
else:
    display(report.fold(average, f"Average-task rows of {len(tests)} tests", test_csv, report_dir))"""),
    ("md", """### As published (paper mode)
The paper's own procedure on its own files: the best temperature per result column,
chosen on the test set, every (teacher, student, method) row a point. These are the
published statistics (`hypothesis_tests.csv`, 352 tests), in the paper's table layout:
cells are `statistic (p)`, t for H1 t-tests, F for the ANOVA, Spearman rho otherwise."""),
    ("code", """if results_source == "paper":
    for domain in published["domain"].unique():
        display(Markdown(f"**{domain}**"))
        display(st.paper_table(published, domain))
else:
    display(Markdown("Study mode: the paper's procedure is not run on our results (it is not valid inference)."))"""),
    ("md", """## Mixed-effects model
improvement ~ task + method [+ log(student size) with 5 or more students], random
intercept per student and, within students, variance components for pairs and tasks
(a student's one SFT run per task is shared by its pairs and methods); REML, per domain.
Designs with too few students or pairs are refused, and a fit that did not converge
shows no coefficients. The method contrasts are checked by the null simulation; the size
slope (fitted with 5 or more students only) is not, and its Wald test leans on few
students: read H3's permutation test instead."""),
    ("code", """mixed.to_csv(output_dir / "mixed_effects.csv", index=False)
display(report.table(mixed))"""),
    ("md", """## Per-run McNemar tests (study mode)
Exact McNemar tests of every KD run against its SFT run on the same examples, every
temperature (nothing selected); `kd_only` / `sft_only` count examples only KD / only
SFT gets right. Holm across the tasks and temperatures of each (teacher, student,
method). Then the same for *agreement with the teacher*: `kd_only` / `sft_only` count
examples where only the KD / only the SFT student gives the teacher's answer."""),
    ("code", """if len(mcnemar):
    mcnemar.to_csv(output_dir / "mcnemar.csv", index=False)
    agreement_mcnemar.to_csv(output_dir / "mcnemar_agreement.csv", index=False)
    for table, what, name in ((mcnemar, "accuracy", "mcnemar.csv"), (agreement_mcnemar, "agreement with the teacher", "mcnemar_agreement.csv")):
        display(report.fold(table, f"McNemar tests of KD vs SFT, {what}: {(table['pvalue_holm'] < 0.05).sum()} of "
                            f"{len(table)} with Holm-adjusted p < 0.05", output_dir / name, report_dir))
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
examples, examples the teacher gets right, examples it gets wrong: copying its
errors); kappa = Cohen's kappa on the answers; error consistency = Cohen's kappa on
correctness, whose chance level comes from the two accuracies, so that an accuracy gain
does not pass for fidelity; BLEU = corpus BLEU of student against teacher rationales;
embedding similarity = mean cosine of MiniLM sentence embeddings. SFT rows compare the
student's SFT model with the same teacher. The paper reports Spearman rho ~ 0.97
between BLEU and embedding similarity."""),
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
