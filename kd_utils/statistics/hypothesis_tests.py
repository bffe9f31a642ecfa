"""Hypothesis tests H1-H5: the paper's procedure as published, and the valid study-mode procedure.

The tests live in one module per job; their names are re-exported here:

- :mod:`~kd_utils.statistics.published_tests`: **as published** (:func:`hypothesis_tests`, on the
  "best"-temperature improvement table): every (teacher, student, method) row is a point, scipy's t-test,
  ANOVA and Spearman. This reproduces the paper's statistics; its temperature was chosen on the test set
  and its rows are not independent, so it is not a valid basis for inference.
- :mod:`~kd_utils.statistics.study_tests`: **valid** (:func:`study_hypothesis_tests`, on the
  "mean"-temperature table): tests count the units the design has (students for H1 and H3, teachers for
  H2, H4 and H5), through the exact tests of :mod:`~kd_utils.statistics.exact`;
- :mod:`~kd_utils.statistics.permutation_tests`: Friedman's test and the within-block permutation Spearman
  the valid procedure is built on;
- :mod:`~kd_utils.statistics.multiple_testing`: Holm's adjustment.

Conventions for both: a test with too few points, or on constant input, gets NaN
statistic and p-value and a ``note`` starting "not testable", and so does a test whose
smallest attainable p-value exceeds alpha (with what would make it testable); tests whose
power for their effect of interest is below 0.8 are noted "underpowered".
"""

from kd_utils.statistics.multiple_testing import holm, holm_adjust
from kd_utils.statistics.permutation_tests import friedman_test, permutation_spearman, spearman_permutation_pvalue
from kd_utils.statistics.published_tests import (
    HYPOTHESES,
    TEST_COLUMNS,
    TestResult,
    hypothesis_tests,
    improvement_ttest,
    method_anova,
    spearman,
)
from kd_utils.statistics.study_tests import (
    BLEU_DOMAINS,
    CORRELATION_TESTS,
    H3_SFT_NOT_TESTABLE,
    STUDY_TEST_COLUMNS,
    UNIT_NAMES,
    agreement_gain_tests,
    study_hypothesis_tests,
    unit_ttest,
)

__all__ = ["BLEU_DOMAINS", "CORRELATION_TESTS", "H3_SFT_NOT_TESTABLE", "HYPOTHESES", "STUDY_TEST_COLUMNS",
           "TEST_COLUMNS", "TestResult", "UNIT_NAMES", "agreement_gain_tests", "friedman_test", "holm",
           "holm_adjust", "hypothesis_tests", "improvement_ttest", "method_anova", "permutation_spearman",
           "spearman", "spearman_permutation_pvalue", "study_hypothesis_tests", "unit_ttest"]
