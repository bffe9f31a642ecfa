"""The Findings of whole synthetic studies: the verdict follows the truth that was simulated."""

import numpy as np
import pytest

from kd_utils import report
from kd_utils.analysis import study_analysis
from kd_utils.statistics import simulation as sim
from kd_utils.statistics.simulation import Design, simulate_study

# 6 students: the sign-flip test of H1 reaches p = 1/64, below 0.05 after Holm over three testable primaries
SIX = sim.crossed(3, 6)
TASKS = tuple((t, d) for d, names in sim.SIM_TASKS.items() for t in names[:3])


def _findings(design: Design, seed: int = 1):
    results, _ = simulate_study(design, np.random.default_rng(seed))
    verdicts = study_analysis(results, n_bootstrap=200, n_permutations=999, mixed_model=False).verdicts
    return verdicts.set_index(["domain", "hypothesis"])["verdict"], report.findings_block(verdicts).data


@pytest.mark.parametrize("seed", [1, 2])
def test_a_large_true_gain_is_supported(seed):
    verdicts, body = _findings(Design(gain=10.0, predictions=False, tasks=TASKS, **SIX), seed)
    assert verdicts.xs("H1_improvement_ttest", level="hypothesis").tolist() == ["supported", "supported"]
    assert body.count("<div class=\"kd-finding kd-supported\"><p><b>H1_improvement_ttest</b>") == 2
    assert "It finds evidence for H1_improvement_ttest (math); H1_improvement_ttest (commonsense)." in body


@pytest.mark.parametrize("seed", [1, 2])
def test_a_null_study_is_not_supported_or_inconclusive(seed):
    # 3000 examples per task: H1 is powered, so the verdict is about the effect, not about n
    verdicts, body = _findings(Design(n_examples=3000, predictions=False, tasks=TASKS, **SIX), seed)
    h1 = verdicts.xs("H1_improvement_ttest", level="hypothesis")
    assert set(h1) <= {"not supported", "inconclusive"}, h1
    assert "supported</span>" not in body.replace("not supported</span>", "")


def test_a_three_student_study_cannot_test_h1_or_h3_and_says_what_would():
    verdicts, body = _findings(Design(predictions=False, tasks=TASKS))
    for hypothesis in ("H1_improvement_ttest", "H3_student_size", "H3_student_sft", "H2_teacher_performance"):
        assert set(verdicts.xs(hypothesis, level="hypothesis")) == {"not testable"}, hypothesis
    assert "It cannot test H1_improvement_ttest (math: power 0.00, n = 3 students)" in body
    assert "needs 5 students" in body and "needs 4 or more teachers" in body
