"""Statistics of the KD study, on the paper's published results or on our own runs.

Modules, one job each:

- :mod:`~kd_utils.statistics.results`: the results.csv schema, validation, model sizes, ids;
- :mod:`~kd_utils.statistics.improvements`: KD runs with their SFT baselines, improvements
  under a temperature rule, fidelity joins, ablation tables;
- :mod:`~kd_utils.statistics.hypothesis_tests`: H1-H5 as the paper computed them
  (:mod:`~kd_utils.statistics.published_tests`) and by the valid unit-level procedure
  (:mod:`~kd_utils.statistics.study_tests`, on the permutation tests of
  :mod:`~kd_utils.statistics.permutation_tests`); Holm (:mod:`~kd_utils.statistics.multiple_testing`);
- :mod:`~kd_utils.statistics.exact`: the exact tests over students (sign flips) and teachers
  (teacher relabellings) that procedure uses;
- :mod:`~kd_utils.statistics.design`: what a design can test, before any result, and what a study's
  results can resolve (the report's study-design numbers);
- :mod:`~kd_utils.statistics.per_example`: the selection/estimation split, bootstrap
  intervals, McNemar tests;
- :mod:`~kd_utils.statistics.models`: the mixed-effects model;
- :mod:`~kd_utils.statistics.power`: power for medium effects and the effect of interest;
- :mod:`~kd_utils.statistics.tolerances`: the numerical tolerances, each with its reason;
- :mod:`~kd_utils.statistics.verdicts`: one verdict per hypothesis from the numbers;
- :mod:`~kd_utils.statistics.paper`: the paper's files, its analysis as published, the re-analysis;
- :mod:`~kd_utils.statistics.simulation` (imported on its own): synthetic studies with known truth, which
  :mod:`kd_utils.pipeline_simulation` puts through the analysis (null and power simulations).

The names below are re-exported so that ``from kd_utils import statistics as st`` serves
the notebook and the tests.
"""

from kd_utils.constants import ADEQUATE_POWER
from kd_utils.statistics.design import design_testability, study_design, study_testability
from kd_utils.statistics.exact import sign_flip_test, teacher_permutation_spearman
from kd_utils.statistics.hypothesis_tests import (
    HYPOTHESES,
    STUDY_TEST_COLUMNS,
    TEST_COLUMNS,
    agreement_gain_tests,
    friedman_test,
    holm,
    holm_adjust,
    hypothesis_tests,
    improvement_ttest,
    method_anova,
    permutation_spearman,
    spearman,
    spearman_permutation_pvalue,
    study_hypothesis_tests,
    unit_ttest,
)
from kd_utils.statistics.improvements import (
    ABLATION_FACTORS,
    KEYS,
    ablation_table,
    attach_fidelity,
    improvement_table,
    independent_sft_accuracy,
    kd_pairs,
    main_pairs,
    seed_spread,
    with_task_average,
)
from kd_utils.statistics.models import mixed_effects
from kd_utils.statistics.paper import (
    PAPER_COLUMN_TASKS,
    PAPER_FIDELITY_FILES,
    PAPER_RESULT_FILES,
    PAPER_TEST_SIZES,
    load_paper_fidelity,
    load_paper_results,
    paper_hypothesis_tests,
    paper_improvements,
    paper_reanalysis,
    paper_table,
    with_sft_counts,
)
from kd_utils.statistics.per_example import (
    example_split,
    improvement_intervals,
    mcnemar_pvalues,
    mcnemar_test,
    mcnemar_tests,
    paired_difference,
    split_counts,
    split_estimates,
)
from kd_utils.statistics.power import GAIN_OF_INTEREST, MEDIUM_EFFECT, medium_effect_power
from kd_utils.statistics.results import (
    BASE_TEACHER_SUFFIX,
    EXPERT,
    KD_METHODS,
    PAPER_METHOD_NAMES,
    RESULTS_COLUMNS,
    ROLES,
    STUDENT_METHODS,
    TASK_UNAWARE,
    load_model_sizes,
    load_results,
    method_label,
    parse_model_size,
    validate_results,
)
from kd_utils.statistics.verdicts import CLAIMS, PRIMARY_HYPOTHESES, SECONDARY_HYPOTHESES, verdict_table
