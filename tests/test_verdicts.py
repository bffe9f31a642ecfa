"""kd_utils.statistics.verdicts on hand-built test rows: Holm within a domain's primary tests, each
verdict branch at its boundaries, and the words the report prints."""

import math

import pandas as pd
import pytest

from kd_utils.statistics.verdicts import VERDICT_COLUMNS, summarise, survives, verdict, verdict_table

NAN = math.nan
GAIN, F, RHO = "a 3-point gain", "Cohen's medium f = 0.25", "Cohen's medium rho = 0.3"
# the pre-registered primaries (the paper's claims) first, then the secondary tests
CLAIM_WORDS = [
    "KD improves the student over its SFT baseline",
    "the gain depends on the teacher's accuracy",
    "smaller students gain more (the paper's claim)",
    "weaker students (lower accuracy measured apart from the gain) gain more (the paper's claim)",
    "the gain tracks teacher-student agreement beyond item difficulty",
    "the gain tracks reasoning fidelity (rationale BLEU with the teacher)",
    "the KD methods (fkl, rkl, gkd) differ in improvement",
    "KD raises the student's agreement with its teacher over SFT",
]
HYPOTHESES = ["H1_improvement_ttest", "H2_teacher_performance", "H3_student_size", "H3_student_sft", "H4_agreement",
              "H5_fidelity", "H1_method_friedman", "H4_kd_vs_sft"]


def primary(hypothesis, pvalue, estimate=NAN, ci=(NAN, NAN), power=NAN, effect=RHO, domain="math", task="average",
             method="all", n=6, note=None):
    return {"domain": domain, "hypothesis": hypothesis, "method": method, "task": task, "statistic": 1.0,
            "pvalue": pvalue, "n": n, "pvalue_holm": 0.999, "note": note, "power": power,
            "effect_of_interest": effect, "estimate": estimate, "ci_low": ci[0], "ci_high": ci[1],
            "unit": "student", "test": "a test"}


@pytest.fixture()
def tests() -> pd.DataFrame:
    return pd.DataFrame([
        primary("H1_improvement_ttest", 0.01, 4.0, (1.0, 7.0), 0.9, GAIN, n=6),
        primary("H1_improvement_ttest", 0.0001, 9.0, (8.0, 10.0), 0.99, GAIN, task="gsm8k"),  # not primary
        primary("H1_improvement_ttest", 0.9, -1.0, (-3.0, 1.0), 0.99, GAIN, method="fkl"),  # not primary
        primary("H1_method_friedman", 0.04, 0.3, power=0.5, effect=F, n=5),
        primary("H2_teacher_performance", 0.5, 0.1, (-0.2, 0.25), 0.9, n=12),
        primary("H3_student_size", 0.3, -0.2, (-0.6, 0.4), 0.85, n=12),
        primary("H5_fidelity", NAN, note="not testable: 2 point(s) < 3", n=2),
        primary("H1_improvement_ttest", 0.02, -2.0, (-4.0, -0.5), 0.9, GAIN, domain="commonsense", n=7),
    ])


def test_verdict_table_holm_within_the_domain_and_every_verdict(tests):
    table = verdict_table(tests)
    assert list(table.columns) == VERDICT_COLUMNS and table.index.tolist() == list(range(16))
    assert table["domain"].tolist() == ["math"] * 8 + ["commonsense"] * 8
    assert table["hypothesis"].tolist() == HYPOTHESES * 2
    assert table["claim"].tolist() == CLAIM_WORDS * 2
    assert table["family"].tolist() == (["primary"] * 6 + ["secondary"] * 2) * 2
    math_rows = table[table.domain == "math"].set_index("hypothesis")
    # Holm over the 3 primary math p-values 0.01, 0.5, 0.3: 0.03, max(0.6, 0.5) = 0.6, 0.6; the secondary
    # Friedman test alone in its family keeps 0.04
    assert math_rows["pvalue_holm"].tolist() == pytest.approx([0.03, 0.6, 0.6, NAN, NAN, NAN, 0.04, NAN],
                                                              nan_ok=True)
    assert math_rows["pvalue"].tolist()[:3] == [0.01, 0.5, 0.3]  # the primary rows, not the per-task ones
    assert math_rows["n"].tolist()[:3] == [6, 12, 12] and str(table["n"].dtype) == "Int64"
    assert math_rows["estimate_label"].tolist() == [
        "mean improvement (pp)", "Spearman rho", "Spearman rho", "Spearman rho", "Spearman rho", "Spearman rho",
        "Kendall's W", "mean agreement gain (pp)"]
    assert math_rows["verdict"].tolist() == [
        "supported", "not supported", "inconclusive", "not testable", "not testable", "not testable",
        "supported", "not testable"]
    assert math_rows["reason"].tolist() == [
        "p (Holm) = 0.03 < 0.05",
        f"p (Holm) = 0.6; the interval excludes {RHO}",
        f"p (Holm) = 0.6 although powered; the interval still holds {RHO}",
        "not testable: no SFT accuracy measured apart from the gain (needs the untuned base model's results or a "
        "second SFT seed per student)",
        "not testable: no agreement measurements (needs per-example predictions of teacher and students)",
        "not testable: 2 point(s) < 3",  # the test's own note, not the generic reason
        "p (Holm) = 0.04 < 0.05",  # secondary: Holm among the secondary tests only
        "not testable: no agreement measurements of SFT and KD students (needs per-example predictions)",
    ]
    sense = table[table.domain == "commonsense"].set_index("hypothesis")
    # alone in its family, Holm leaves 0.02 as it is; significant, but the gain is negative
    assert sense.loc["H1_improvement_ttest", "pvalue_holm"] == pytest.approx(0.02)
    assert sense.loc["H1_improvement_ttest", "verdict"] == "not supported"
    assert sense.loc["H1_improvement_ttest", "reason"] == "significant in the opposite direction (p (Holm) = 0.02)"
    assert sense["reason"].tolist()[1:3] == ["not testable: no test rows"] * 2
    assert sense["reason"].tolist()[5] == ("not testable: no rationale BLEU test (needs predictions; the paper tests "
                                           "BLEU on math only)")


def test_verdict_table_alpha_and_domains(tests):
    strict = verdict_table(tests, alpha=0.01).set_index(["domain", "hypothesis"])
    # Holm 0.04 >= 0.01; the interval 1..7 holds the 3-point gain and the power is 0.9
    assert strict.loc[("math", "H1_improvement_ttest"), "verdict"] == "inconclusive"
    assert strict.loc[("commonsense", "H1_improvement_ttest"), "reason"] == (
        "the interval lies below 0 (p (Holm) = 0.02)")
    only = verdict_table(tests, domains=["commonsense", "code"])
    assert only["domain"].tolist() == ["commonsense"] * 8 + ["code"] * 8
    code = only[only.domain == "code"]
    assert (code["verdict"] == "not testable").all() and code["pvalue_holm"].isna().all()
    assert code["n"].isna().all()
    assert only["pvalue_holm"].dtype == float  # NaN, not None, where a domain has no p-value at all
    untested = verdict_table(tests, domains=["code"])
    assert all(untested[c].dtype == float for c in ("pvalue_holm", "estimate", "ci_low", "ci_high", "power"))


def test_verdict_table_of_no_tests_is_empty_with_the_columns(tests):
    empty = verdict_table(tests.iloc[:0])
    assert list(empty.columns) == VERDICT_COLUMNS and len(empty) == 0 and str(empty["n"].dtype) == "Int64"


def row(hypothesis="H2_teacher_performance", pvalue=0.2, holm=0.2, estimate=0.1, ci=(-0.5, 0.5), power=0.9,
        effect=RHO, **extra):
    return pd.Series({"hypothesis": hypothesis, "pvalue": pvalue, "pvalue_holm": holm, "estimate": estimate,
                      "ci_low": ci[0], "ci_high": ci[1], "power": power, "effect_of_interest": effect, **extra})


def test_no_pvalue_is_not_testable_with_the_note_or_a_default():
    assert verdict(row(pvalue=NAN, note="too few units")) == ("not testable", "too few units")
    assert verdict(row(pvalue=NAN, note=None)) == ("not testable", "no p-value")
    assert verdict(row(pvalue=NAN, note="")) == ("not testable", "no p-value")
    assert verdict(row(pvalue=NAN)) == ("not testable", "no p-value")


def test_significance_is_strictly_below_alpha_on_the_holm_value():
    assert verdict(row(pvalue=0.001, holm=0.049)) == ("supported", "p (Holm) = 0.049 < 0.05")
    assert verdict(row(pvalue=0.001, holm=0.012345)) == ("supported", "p (Holm) = 0.0123 < 0.05")
    assert verdict(row(pvalue=0.001, holm=0.05))[0] == "inconclusive"  # p = alpha is not significant
    assert verdict(row(pvalue=0.001, holm=0.03), alpha=0.01)[0] == "inconclusive"
    assert verdict(row(pvalue=0.001, holm=0.005), alpha=0.01) == ("supported", "p (Holm) = 0.005 < 0.01")


def test_direction_only_for_one_sided_claims():
    # two-sided claims: a negative correlation supports them
    assert verdict(row(holm=0.01, estimate=-0.4))[0] == "supported"
    assert verdict(row("H9_unknown", holm=0.01, estimate=-0.4, effect=None))[0] == "supported"
    h1 = dict(hypothesis="H1_improvement_ttest", effect=GAIN, ci=(0.5, 6.0))
    assert verdict(row(holm=0.01, estimate=2.0, **h1))[0] == "supported"
    assert verdict(row(holm=0.01, estimate=0.5, **h1))[0] == "supported"  # any gain above 0
    assert verdict(row(holm=0.01, estimate=0.0, **h1)) == (
        "not supported", "significant in the opposite direction (p (Holm) = 0.01)")  # a zero gain is no gain
    kd = dict(hypothesis="H4_kd_vs_sft", effect=None, ci=(-1.0, 0.5))
    assert verdict(row(holm=0.01, estimate=-0.1, **kd))[0] == "not supported"


def test_an_interval_below_zero_rules_out_a_gain():
    h1 = dict(hypothesis="H1_improvement_ttest", holm=0.3, estimate=-1.0, effect=GAIN)
    assert verdict(row(ci=(-3.0, -0.1), **h1)) == ("not supported", "the interval lies below 0 (p (Holm) = 0.3)")
    # the interval reaching 0 is not below it, but it still excludes the 3-point gain
    assert verdict(row(ci=(-3.0, 0.0), **h1)) == ("not supported",
                                                   f"p (Holm) = 0.3; the interval excludes {GAIN}")
    kd = dict(hypothesis="H4_kd_vs_sft", holm=0.3, estimate=-1.0, effect=None, power=0.9)
    assert verdict(row(ci=(-3.0, -0.1), **kd)) == ("not supported", "the interval lies below 0 (p (Holm) = 0.3)")
    # two-sided claims are not judged by the sign of the interval
    assert verdict(row(holm=0.3, estimate=-0.2, ci=(-0.45, -0.01), power=0.9))[0] == "inconclusive"


def test_the_effect_of_interest_is_excluded_only_strictly():
    h1 = dict(hypothesis="H1_improvement_ttest", holm=0.3, estimate=1.0, effect=GAIN, power=0.9)
    assert verdict(row(ci=(0.5, 2.99), **h1))[0] == "not supported"
    assert verdict(row(ci=(0.5, 3.0), **h1))[0] == "inconclusive"  # the interval touches 3: it holds the gain
    assert verdict(row(ci=(NAN, 2.0), **h1))[0] == "inconclusive"
    assert verdict(row(ci=(0.5, NAN), **h1))[0] == "inconclusive"
    assert verdict(row(ci=(-0.29, 0.29)))[0] == "not supported"
    assert verdict(row(ci=(-0.3, 0.29)))[0] == "inconclusive"
    assert verdict(row(ci=(-0.29, 0.3)))[0] == "inconclusive"
    assert verdict(row(ci=(NAN, 0.1)))[0] == "inconclusive"
    assert verdict(row(ci=(-0.1, NAN)))[0] == "inconclusive"
    # no effect of interest (the method comparison): never excluded
    assert verdict(row("H1_method_friedman", ci=(-0.01, 0.01), effect=F))[0] == "inconclusive"


def test_power_below_0_8_or_unknown_is_underpowered():
    assert verdict(row(power=0.79)) == ("underpowered", f"p (Holm) = 0.2; power 0.79 < 0.8 for {RHO}")
    assert verdict(row(power=NAN)) == ("underpowered", f"p (Holm) = 0.2; power unknown < 0.8 for {RHO}")
    assert verdict(row(power=0.8)) == ("inconclusive",
                                       f"p (Holm) = 0.2 although powered; the interval still holds {RHO}")


def test_survives():
    assert survives("supported", "supported") == "yes"
    assert survives("supported", "not supported") == "no: ruled out"
    assert survives("supported", "underpowered") == "no: not shown (underpowered)"
    assert survives("supported", "inconclusive") == "no: not shown (inconclusive)"
    assert survives("not supported", "not supported") == "yes: the effect of interest is ruled out"
    assert survives("not supported", "supported") == "no: the effect is found"
    assert survives("not supported", "underpowered") == (
        "partly: not significant here either, but underpowered, so no evidence of absence")


def test_summarise_counts_tasks_strictly_below_0_05():
    assert summarise(pd.Series([0.01, 0.05, 0.049999, NAN, 0.7])) == "2 of 4 tasks p < 0.05"
    assert summarise(pd.Series([NAN, NAN])) == "0 of 0 tasks p < 0.05"
