# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
# The analysis of a KD study (study mode) or of the paper's published results (paper mode); the
# rendered report opens with the study's title, provenance and, for a small study, a banner.
results_source = "study"  # "study" or "paper"
results_path = "outputs/default/results.csv"  # study mode
paper_results_dir = "../shared/data/kd-paper-results"  # paper mode
output_dir = "outputs/default/analysis"
runs_dir = None  # per-example predictions; default: <results dir>/runs
# compact per-example export, read when runs_dir is absent; default: <results dir>/correctness.csv.gz
correctness_path = None
models_path = None  # models.csv (model, n_params); default: <results dir>/models.csv
n_bootstrap = 2000
bootstrap_seed = 0  # also seeds the selection/estimation split and Monte Carlo permutations
n_permutations = 9999
embeddings = True  # embedding similarity with the packaged MiniLM (study mode, needs predictions)
primary_hypotheses = None  # the pre-registered primary family (None: the paper's claims, H1, H2, H3 x 2, H4, H5)
report_dir = None  # where the HTML report is read from, for its links to the CSVs; default: output_dir

# %%
import json
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
    raise ValueError(f"results_source must be 'paper' or 'study', got {results_source!r}")

# %%
if results_source == "paper":
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
                              seed=bootstrap_seed,
                              primaries=tuple(primary_hypotheses) if primary_hypotheses else None)
    improvements, tests, verdicts, mixed = analysis.improvements, analysis.tests, analysis.verdicts, analysis.mixed
    fidelity, mcnemar, agreement_mcnemar = analysis.fidelity, analysis.mcnemar, analysis.agreement_mcnemar
    tests.to_csv(output_dir / "hypothesis_tests.csv", index=False)
improvements.to_csv(output_dir / "improvements.csv", index=False)
verdicts.to_csv(output_dir / "verdicts.csv", index=False)

# %%
display(Markdown(f"# {report.report_title(results_source, results)}"))
study_mode = results_source == "study"
provenance = report.provenance(
    {"results_source": results_source, "results_path": results_path, "paper_results_dir": paper_results_dir,
     "output_dir": output_dir, "runs_dir": runs_dir, "correctness_path": correctness_path, "models_path": models_path,
     "n_bootstrap": n_bootstrap, "n_permutations": n_permutations, "bootstrap_seed": bootstrap_seed,
     "embeddings": embeddings, "report_dir": report_dir, "primary_hypotheses": primary_hypotheses},
    results, study_dir=study_dir if study_mode else None, runs_dir=runs_dir if study_mode else None,
    paper_dir=None if study_mode else paper_results_dir,
    model_sizes=st.load_model_sizes(models_csv) if study_mode and models_csv.is_file() else None)
write_atomic(output_dir / "provenance.json", json.dumps(provenance, indent=1, default=str))
design = report.study_design(results, improvements)
design.to_csv(output_dir / "study_design.csv", index=False)
banner = report.study_banner(design, power=verdicts["power"],
                             description=provenance["study_parameters"].get("description", ""),
                             design_href=report.link(output_dir / "study_design.csv", report_dir))
if banner is not None:
    display(banner)
testability = st.study_testability(reanalysed if results_source == "paper" else improvements)
testability.to_csv(output_dir / "study_testability.csv", index=False)
display(Markdown("**What this design can test**: per hypothesis its units, the smallest p-value the design "
                 "allows, and (where it cannot reach 0.05) the design change that would make it testable."))
display(report.table(testability))

# %% [markdown]
# ## Findings
# One verdict per domain and hypothesis, from its test on the average over the domain's
# tasks, methods pooled, by the valid procedure. The pre-registered primary hypotheses
# (the paper's claims by default: H1, H2, H3 size, H3 SFT accuracy, H4, H5) are
# Holm-adjusted together, over those the design can test; the method comparison and
# H4_kd_vs_sft are secondary, reported apart with their own Holm. **supported**
# (significant in the claimed direction), **not supported** (not significant and the
# interval rules out the effect of interest, a 3-point gain), **underpowered** (not
# significant, power below 0.8), **inconclusive** (not significant although powered) or
# **not testable** (the design cannot reach p < 0.05, with what would make it testable;
# or no data). In paper mode
# the paper's own conclusion and whether it survives stand beside ours (`verdicts.csv`).

# %%
finding_columns = ["domain", "hypothesis", "n", "estimate", "ci_low", "ci_high", "pvalue", "pvalue_holm", "power",
                   "verdict"] + (["paper_conclusion", "survives"] if results_source == "paper" else [])
display(report.findings_block(verdicts))
display(report.table(verdicts[finding_columns]))

# %% [markdown]
# ## Provenance

# %%
display(report.provenance_html(provenance, report.link(output_dir / "provenance.json", report_dir)))
display(Markdown(f"{results['run_id'].nunique()} runs, {len(improvements)} (teacher, student, method, task) rows."))

# %% [markdown]
# ## About this analysis
# Reproduces the hypothesis tests of Ramesh, Sengupta & Chakraborty, *On the Generalization
# vs Fidelity Paradox in Knowledge Distillation* (ACL Findings 2025), either from the
# paper's published per-run results (`results_source="paper"`) or from our own study
# (`results_source="study"`, an `outputs/<study>/results.csv`).
#
# *Improvement* = KD accuracy minus the student's SFT accuracy, in percentage points. In
# study mode it is the mean over the temperatures (nothing is chosen on the test data), and
# tests count independent units (students, or pairs within students); paper mode shows
# the paper's statistics as published (temperature chosen on the test set) and, beside
# them, the same hypotheses re-analysed by the valid procedure. Method ids are shown with the paper's
# names: fkl (SeqKD), rkl (RevKD), gkd (GKD); seqkd is sequence-level KD (Kim & Rush).
# Relative paths resolve against the repository root (where `kd_utils.report.render_report`
# runs the kernel, and where this notebook moves when opened from `notebooks/`).
#
# Inputs. Paper mode: the paper's result files (`student` runs, task-unaware-teacher runs kept
# only for the expertise ablation), agreement from `EM1*.csv` and BLEU from `BLEU.csv`.
# Study mode: our results table; student sizes from `models.csv` when present, else
# parsed from model names; fidelity from per-example predictions when present. Every table
# of this report is also a CSV file beside it (linked from each folded table).

# %% [markdown]
# ### How far these tests can be trusted
# Whole-pipeline simulation (`benchmarks/null_simulation.py`, scenarios in
# `kd_utils.statistics.simulation.SCENARIOS`): synthetic studies with logistic item
# difficulty shared by all models, teacher effects on the gain unrelated to teacher
# accuracy, method-by-student effects, training-run noise of every SFT and KD run,
# agreement and BLEU carrying teacher effects, in crossed 3 x 3 and 5 x 5 designs and the
# paper's unbalanced one (the sharp null kept as one scenario), put through this same
# analysis. `rate`: how often a test family rejected at alpha = 0.05 (null scenarios: the
# type I error; power scenarios: the power), with its standard error (studies as
# clusters). Rows "before" are the procedure this one replaced, "as published" the
# paper's, on the same studies.

# %%
validity = read_validity()
if len(validity):
    display(report.fold(validity, f"Rejection rates of {validity['family'].nunique()} test families in "
                                  f"{validity['scenario'].nunique()} scenarios"))
else:
    display(Markdown("No simulation results found (run benchmarks/null_simulation.py)."))

# %% [markdown]
# ## Improvements
# Average over tasks per teacher -> student pair, in percentage points, a column per method
# (every task is in the folded table and in `improvements.csv`). In study mode `improvement` is the mean over
# temperatures with bootstrap 95% intervals over test examples (`ci_low`/`ci_high`, paired when
# predictions exist; they do not cover seed-to-seed training variation);
# `improvement_selected` is the honest "best temperature" estimate (chosen on half A of
# every test set, measured on half B; needs predictions). Paper mode: the paper's
# best-temperature improvements, as published.

# %%
if len(improvements) == 0:
    display(Markdown("**No KD student has an SFT run of the same student to compare with: "
                     "every improvement-based section below is empty.**"))
else:
    display(report.table(report.improvement_summary(improvements)))
    display(report.fold(improvements[improvements["task"] != "average"].dropna(axis=1, how="all"),
                        "Every task: KD and SFT accuracy, improvement, teacher accuracy, student size",
                        output_dir / "improvements.csv", report_dir))

# %% [markdown]
# ### Run-to-run spread
# The intervals above cover the test examples, not training. Where a student configuration was trained
# with two or more seeds (each evaluated on the same items), this is the spread across seeds, in
# percentage points: accuracy, and for KD runs the improvement over the same seed's SFT run (`_sd` the
# standard deviation across seeds, `_min`/`_max` the range). Average over tasks below, every task in
# `seed_spread.csv`.

# %%
spread = st.seed_spread(results)
spread.to_csv(output_dir / "seed_spread.csv", index=False)
if len(spread):
    display(report.fold(spread[spread["task"] == "average"] if (spread["task"] == "average").any() else spread,
                        f"Spread across seeds of {len(spread)} (configuration, task) rows",
                        output_dir / "seed_spread.csv", report_dir))
else:
    display(Markdown("Every student configuration was trained with one seed: the spread across training runs "
                     "is not measured."))

# %% [markdown]
# ## Hypothesis tests
# Valid procedure (study mode; the paper's re-analysis): H1 an exact one-sided sign-flip
# test over students (each student's pairs share its one SFT run; its interval inverts
# the same test) and a Friedman test of the methods with students as blocks; H2 / H4 / H5
# Spearman of improvement with the teacher's accuracy / agreement / rationale BLEU,
# compared within students, p-values from relabelling whole teachers across all students
# (a teacher shared by students is one unit); H3 Spearman over students, one-sided in the
# paper's direction, with size and with an SFT accuracy measured apart from the gain (the
# untuned base model, or a spare SFT seed: else not testable, since the student's one SFT
# run enters both); H4 in study mode uses error consistency beyond item difficulty (chance
# agreement within strata of item difficulty), the paper's files hold raw agreement only,
# which rises with accuracy by construction, so H4 is not tested on them;
# H4_kd_vs_sft tests whether KD raises agreement over SFT. `pvalue` is the p-value
# everything uses, `pvalue_holm` adjusts it across tasks; `power` is for the effect of
# interest. Average-task rows below, every row in the CSV.

# %%
average = tests[tests["task"] == "average"].dropna(axis=1, how="all")
test_csv = output_dir / ("hypothesis_tests.csv" if results_source == "study" else "hypothesis_tests_reanalysis.csv")
if len(average) == 0:
    display(Markdown("No tests: no improvements to test."))
elif len(average) <= 40:
    display(report.table(average))
else:
    display(report.fold(average, f"Average-task rows of {len(tests)} tests", test_csv, report_dir))

# %% [markdown]
# ### As published (paper mode)
# The paper's own procedure on its own files: the best temperature per result column,
# chosen on the test set, every (teacher, student, method) row a point. These are the
# published statistics (`hypothesis_tests.csv`, 352 tests), in the paper's table layout:
# cells are `statistic (p)`, t for H1 t-tests, F for the ANOVA, Spearman rho otherwise.

# %%
if results_source == "paper":
    for domain in published["domain"].unique():
        display(Markdown(f"**{domain}**"))
        display(st.paper_table(published, domain))
else:
    display(Markdown("Study mode: the paper's procedure is not run on our results (it is not valid inference)."))

# %% [markdown]
# ## Mixed-effects model
# improvement ~ task + method [+ log(student size) with 5 or more students], random
# intercept per student and, within students, variance components for pairs and tasks
# (a student's one SFT run per task is shared by its pairs and methods); REML, per domain.
# Designs with too few students or pairs are refused, and a fit that did not converge
# shows no coefficients. Descriptive only: coefficients and model-based standard errors,
# no p-values or intervals (with 3-6 students and no method-by-student slopes, Wald z
# overstates the evidence by orders of magnitude); the tests above are the inference.

# %%
mixed.to_csv(output_dir / "mixed_effects.csv", index=False)
display(report.table(mixed))

# %% [markdown]
# ## Per-run McNemar tests (study mode)
# Exact McNemar tests of every KD run against its SFT run on the same examples, every
# temperature (nothing selected); `kd_only` / `sft_only` count examples only KD / only
# SFT gets right. Holm across the tasks and temperatures of each (teacher, student,
# method). Then the same for *agreement with the teacher*: `kd_only` / `sft_only` count
# examples where only the KD / only the SFT student gives the teacher's answer.

# %%
if len(mcnemar):
    mcnemar.to_csv(output_dir / "mcnemar.csv", index=False)
    agreement_mcnemar.to_csv(output_dir / "mcnemar_agreement.csv", index=False)
    for table, what, name in ((mcnemar, "accuracy", "mcnemar.csv"),
                              (agreement_mcnemar, "agreement with the teacher", "mcnemar_agreement.csv")):
        display(report.fold(table, f"McNemar tests of KD vs SFT, {what}: {(table['pvalue_holm'] < 0.05).sum()} of "
                            f"{len(table)} with Holm-adjusted p < 0.05", output_dir / name, report_dir))
else:
    display(Markdown("No per-example predictions, so no McNemar tests."))

# %% [markdown]
# ## Figures

# %%
if improvements["student_size"].notna().any():
    plots.improvement_vs_size(improvements, figures_dir)
else:
    display(Markdown("No student sizes (models.csv or sizes in model names): H3 size and this figure are skipped."))
for domain in improvements["domain"].unique():
    plots.task_differences(improvements, domain, figures_dir)
    if results_source == "study":
        plots.average_differences(improvements, st.main_pairs(results), domain, figures_dir)

# %% [markdown]
# ## Ablations
# Temperature (task-expert teacher, no noise), Gaussian noise on the teacher's logits
# (sigma 0 is the baseline) and teacher expertise (task expert vs task-unaware), each
# over the configurations where that factor varies.

# %%
for factor in st.ABLATION_FACTORS:
    table = st.ablation_table(results, factor)
    table.to_csv(output_dir / f"ablation_{factor}.csv", index=False)
    if len(table):
        display(Markdown(f"### {factor}"))
        display(report.fold(table[table["task"] == "average"] if (table["task"] == "average").any() else table,
                            f"{factor} ablation: accuracy and improvement per configuration, average over tasks",
                            output_dir / f"ablation_{factor}.csv", report_dir))
        plots.ablation_curve(table, factor, figures_dir)
    else:
        display(Markdown(f"### {factor}\nNo runs vary {factor}."))

# %% [markdown]
# ## Fidelity
# Agreement = how often the student's extracted answer equals the teacher's (all
# examples, examples the teacher gets right, examples it gets wrong: copying its
# errors); kappa = Cohen's kappa on the answers; error consistency = Cohen's kappa on
# correctness, whose chance level comes from the two accuracies, so that an accuracy gain
# does not pass for fidelity; BLEU = corpus BLEU of student against teacher rationales;
# embedding similarity = mean cosine of MiniLM sentence embeddings. SFT rows compare the
# student's SFT model with the same teacher. The paper reports Spearman rho ~ 0.97
# between BLEU and embedding similarity.

# %%
if len(fidelity):
    fidelity.to_csv(output_dir / "fidelity.csv", index=False)
    display(report.fold(fidelity, "Agreement, BLEU and embedding similarity per student run and task",
                        output_dir / "fidelity.csv", report_dir))
if len(fidelity) and fidelity["embedding_similarity"].notna().any():
    display(Markdown("BLEU vs embedding similarity, Spearman over (run, task) rows:"))
    display(fd.bleu_embedding_agreement(fidelity))
    plots.scatter(fidelity, "bleu", "embedding_similarity", "bleu_vs_embedding", figures_dir)
for metric in ("agreement", "bleu"):
    if metric in improvements and improvements[metric].notna().any():
        plots.scatter(improvements, metric, "improvement", f"{metric}_vs_improvement", figures_dir)
