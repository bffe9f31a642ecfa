"""The study-mode analysis in one call: from results.csv (and predictions, when present) to every table.

The analysis notebook calls :func:`study_analysis`, and so does the whole-pipeline null
simulation (:mod:`kd_utils.statistics.simulation`), so what the simulation checks is
what the report shows. The design (see :mod:`kd_utils.statistics.hypothesis_tests`):
improvements are the mean over temperatures (nothing is selected on test data); the
selected-temperature estimate comes from a selection/estimation split of every test set;
H3's SFT accuracy is measured apart from the gains (the base model or a spare SFT seed);
tests count students or teachers, not rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kd_utils import fidelity as fd
from kd_utils import statistics as st
from kd_utils.constants import N_RESAMPLES
from kd_utils.predictions import CORRECTNESS_FILE, as_predictions, read_correctness
from kd_utils.statistics.study_tests import BLEU_DOMAINS


@dataclass
class StudyAnalysis:
    """The tables of one study's analysis (empty tables where the data do not allow them)."""

    improvements: pd.DataFrame
    tests: pd.DataFrame
    verdicts: pd.DataFrame
    mixed: pd.DataFrame
    fidelity: pd.DataFrame = field(default_factory=pd.DataFrame)
    mcnemar: pd.DataFrame = field(default_factory=pd.DataFrame)
    agreement_mcnemar: pd.DataFrame = field(default_factory=pd.DataFrame)


def study_analysis(results: pd.DataFrame, model_sizes: Mapping[str, float] | None = None, predictions=None,
                   embedder=None, fidelity: pd.DataFrame | None = None, n_bootstrap: int = 2000,
                   n_permutations: int = N_RESAMPLES, seed: int = 0, mixed_model: bool = True,
                   bleu_domains: tuple[str, ...] = BLEU_DOMAINS,
                   primaries: tuple[str, ...] | None = None) -> StudyAnalysis:
    """Improvements (mean over temperatures) with split estimates and bootstrap intervals, the valid
    H1-H5 tests and their verdicts, McNemar tests of accuracy and of agreement, the mixed model.

    ``predictions``: a runs directory or a :class:`~kd_utils.predictions.Predictions` (None: the
    analysis runs on results.csv alone). ``fidelity``: a precomputed
    :func:`~kd_utils.fidelity.fidelity_table` (else computed from the predictions, with
    ``embedder`` for embedding similarity). ``seed`` drives the split, the bootstrap and the
    Monte Carlo permutations; ``bleu_domains``: where H5 (rationale BLEU) is tested;
    ``primaries``: the pre-registered primary hypotheses (None: the paper's claims,
    :data:`~kd_utils.statistics.verdicts.PRIMARY_HYPOTHESES`), Holm-adjusted together; the
    other tests are reported as secondary.
    """
    predictions = as_predictions(predictions)
    improvements = st.improvement_table(results, model_sizes, temperature="mean")
    if fidelity is None:
        fidelity = fd.fidelity_table(results, predictions, embedder) if predictions is not None else pd.DataFrame()
    if len(fidelity):
        improvements = st.attach_fidelity(improvements, fidelity)
    improvements = st.split_estimates(results, improvements, st.split_counts(results, predictions, seed))
    improvements = st.improvement_intervals(results, improvements, predictions, n_bootstrap, seed=seed)
    improvements = st.independent_sft_accuracy(results, improvements)
    tests = st.study_hypothesis_tests(improvements, n_resamples=n_permutations, seed=seed, bleu_domains=bleu_domains)
    if len(fidelity):
        tests = pd.concat([tests, st.agreement_gain_tests(fidelity, measure="error_consistency_stratified")],
                          ignore_index=True)
    out = StudyAnalysis(improvements=improvements, tests=tests,
                        verdicts=st.verdict_table(tests, domains=list(dict.fromkeys(results["domain"])),
                                                  primaries=primaries),
                        mixed=st.mixed_effects(improvements) if mixed_model else pd.DataFrame(), fidelity=fidelity)
    if predictions is not None:
        out.mcnemar = st.mcnemar_tests(results, predictions)
        out.agreement_mcnemar = fd.agreement_mcnemar_tests(results, predictions)
    return out


def analysis_tables(analysis: StudyAnalysis, results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The CSV files the analysis notebook writes in study mode, by file name (the empty ones it skips left out)."""
    tables = {"improvements.csv": analysis.improvements, "hypothesis_tests.csv": analysis.tests,
              "verdicts.csv": analysis.verdicts, "mixed_effects.csv": analysis.mixed,
              "study_design.csv": st.study_design(results, analysis.improvements),
              "study_testability.csv": st.study_testability(analysis.improvements),
              "seed_spread.csv": st.seed_spread(results),
              **{f"ablation_{f}.csv": st.ablation_table(results, f) for f in st.ABLATION_FACTORS}}
    for name, table in (("fidelity.csv", analysis.fidelity), ("mcnemar.csv", analysis.mcnemar),
                        ("mcnemar_agreement.csv", analysis.agreement_mcnemar)):
        if len(table):
            tables[name] = table
    return tables


def reanalyse_study(study_dir: str | Path, predictions=None) -> dict[str, pd.DataFrame]:
    """A study's analysis tables again from its small files: results.csv, models.csv, the per-example
    export (``correctness.csv.gz``; or ``predictions``, a runs directory or store) and the analysis
    parameters recorded in ``analysis/provenance.json`` (bootstrap and permutation counts, seed, the
    pre-registered primary hypotheses).

    The export holds no generated text, so rationale BLEU and embedding similarity come out missing:
    a study with generated rationales (H5) is reproduced from its predictions, not from the export.
    """
    study_dir = Path(study_dir)
    results = st.load_results(study_dir / "results.csv")
    models = study_dir / "models.csv"
    provenance = study_dir / "analysis" / "provenance.json"
    used = json.loads(provenance.read_text())["analysis_parameters"] if provenance.is_file() else {}
    if predictions is None and (study_dir / CORRECTNESS_FILE).is_file():
        predictions = read_correctness(study_dir / CORRECTNESS_FILE)
    analysis = study_analysis(results, st.load_model_sizes(models) if models.is_file() else None, predictions,
                              n_bootstrap=int(used.get("n_bootstrap", 2000)),
                              n_permutations=int(used.get("n_permutations", N_RESAMPLES)),
                              seed=int(used.get("bootstrap_seed", 0)),
                              primaries=tuple(used["primary_hypotheses"]) if used.get("primary_hypotheses") else None)
    return analysis_tables(analysis, results)
