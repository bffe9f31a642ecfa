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

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from kd_utils import fidelity as fd
from kd_utils import statistics as st
from kd_utils.predictions import as_predictions
from kd_utils.statistics.hypothesis_tests import BLEU_DOMAINS


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
                   n_permutations: int = 9999, seed: int = 0, mixed_model: bool = True,
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
