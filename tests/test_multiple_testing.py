"""Holm's family: one family per (domain, hypothesis, method), adjusted across tasks.

The case below changes its adjusted p-values when any of the three keys is dropped from the
family (values worked out by hand in the comments).
"""

import pandas as pd
import pytest

from kd_utils.statistics import holm, holm_adjust

TESTS = pd.DataFrame([
    # domain, hypothesis, method, task, pvalue, Holm within (domain, hypothesis, method)
    ("math", "H1", "fkl", "gsm8k", 0.01, 0.02),  # family {0.01, 0.04}: 0.01*2, then max(0.02, 0.04*1)
    ("math", "H1", "fkl", "svamp", 0.04, 0.04),
    ("math", "H1", "rkl", "gsm8k", 0.02, 0.04),  # family {0.02, 0.03}: 0.02*2, then max(0.04, 0.03*1)
    ("math", "H1", "rkl", "svamp", 0.03, 0.04),
    ("math", "H2", "fkl", "gsm8k", 0.02, 0.02),  # a family of one
    ("commonsense", "H1", "fkl", "boolq", 0.01, 0.01),  # a family of one
], columns=["domain", "hypothesis", "method", "task", "pvalue", "expected"])


def test_holm_families_are_domain_hypothesis_and_method():
    out = holm_adjust(TESTS.drop(columns="expected"))
    assert out["pvalue_holm"].tolist() == pytest.approx(TESTS["expected"].tolist(), abs=1e-15)


@pytest.mark.parametrize("family, expected", [
    # without method, math/H1 is one family {0.01, 0.02, 0.03, 0.04}: 0.04, 0.06, 0.06, 0.06
    (("domain", "hypothesis"), [0.04, 0.06, 0.06, 0.06, 0.02, 0.01]),
    # without hypothesis, math/fkl joins H1 and H2 {0.01, 0.04, 0.02}: 0.03, 0.04, 0.04
    (("domain", "method"), [0.03, 0.04, 0.04, 0.04, 0.04, 0.01]),
    # without domain, H1/fkl joins math and commonsense {0.01, 0.04, 0.01}: 0.03, 0.04, 0.03
    (("hypothesis", "method"), [0.03, 0.04, 0.04, 0.04, 0.02, 0.03]),
])
def test_each_family_key_matters(family, expected):
    out = holm_adjust(TESTS.drop(columns="expected"), family=family)
    assert out["pvalue_holm"].tolist() == pytest.approx(expected, abs=1e-15)
    assert out["pvalue_holm"].tolist() != pytest.approx(TESTS["expected"].tolist(), abs=1e-15)


def test_rows_without_a_pvalue_or_with_a_blank_family_key():
    tests = pd.DataFrame([
        ("math", "H1", None, "gsm8k", 0.01),  # a blank method is a family of its own
        ("math", "H1", None, "svamp", 0.04),
        ("math", "H1", "fkl", "gsm8k", float("nan")),  # no p-value: stays NaN, counts for no family
        ("math", "H1", "fkl", "svamp", 0.03),
    ], columns=["domain", "hypothesis", "method", "task", "pvalue"])
    out = holm_adjust(tests)
    assert list(out.columns) == list(tests.columns) + ["pvalue_holm"]
    assert out["pvalue_holm"].tolist()[:2] == pytest.approx([0.02, 0.04], abs=1e-15)  # {0.01, 0.04}
    assert pd.isna(out["pvalue_holm"].iloc[2]) and out["pvalue_holm"].iloc[3] == pytest.approx(0.03, abs=1e-15)
    assert list(holm_adjust(tests.iloc[2:3]).columns) == list(tests.columns) + ["pvalue_holm"]


def test_holm_caps_at_one():
    # 0.6 * 2 and max(1.2, 0.7): both capped at 1
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]
