"""Tests whose units match the design, each pinned by a small hand-built design: the sign-flip test
over students, teachers as units for H2/H4/H5, the Friedman test over students, H3 against an
SFT accuracy measured apart from the gain, error consistency beyond item difficulty, the
pre-registered primary family, and what a design can test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from kd_utils import fidelity as fd
from kd_utils import statistics as st
from kd_utils.statistics import simulation as sim
from kd_utils.statistics.exact import sign_flip_test, teacher_permutation_spearman

# ----------------------------------------------------------------------------- H1: sign flips over students


def test_sign_flip_p_is_the_share_of_sign_patterns_by_hand():
    y = np.array([4.0, -1.0, 2.0, 3.0, 5.0])
    patterns = np.array(list(itertools.product([-1, 1], repeat=5)))
    expected = np.mean(patterns @ y >= y.sum() - 1e-9)
    res = sign_flip_test(y, "greater")
    assert res["pvalue"] == pytest.approx(expected) == pytest.approx(2 / 32)  # none flipped, or only the -1
    assert res["estimate"] == pytest.approx(2.6) and res["n"] == 5 and res["min_pvalue"] == pytest.approx(1 / 32)
    # one collapse of -55 points: the 16 patterns that flip it, and of the others only the observed one
    assert sign_flip_test([4.0, -55.0, 2.0, 3.0, 5.0], "greater")["pvalue"] == pytest.approx(17 / 32)


def test_sign_flip_interval_is_the_same_test_inverted():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.normal(1.0, 2.0, 7)
        res = sign_flip_test(y, "greater")
        # the lower bound is above 0 exactly when the one-sided test rejects at 0.05
        assert (res["ci_low"] > 0) == (res["pvalue"] <= 0.05)
        # a true mean just above the bound is not rejected, just below it is
        assert sign_flip_test(y - (res["ci_low"] + 1e-6), "greater")["pvalue"] > 0.05
        assert sign_flip_test(y - (res["ci_low"] - 1e-6), "greater")["pvalue"] <= 0.05
        assert sign_flip_test(y - (res["ci_high"] - 1e-6), "less")["pvalue"] > 0.05
        assert sign_flip_test(y - (res["ci_high"] + 1e-6), "less")["pvalue"] <= 0.05
        assert res["ci_low"] <= res["estimate"] <= res["ci_high"]


def test_too_few_students_for_a_sign_flip_test_are_not_testable_with_the_fix():
    res = sign_flip_test([3.0, 4.0, 5.0, 6.0], "greater")
    assert math.isnan(res["pvalue"]) and res["min_pvalue"] == pytest.approx(1 / 16)
    assert res["note"] == "not testable: 4 student(s) allow a smallest p of 0.0625 > 0.05; needs 5 students"
    assert sign_flip_test([1.0, 2.0, 3.0, 4.0, 5.0], "two-sided")["note"].endswith("needs 6 students")


# ----------------------------------------------------------------------------- H2/H4/H5: teachers as units


def shared_teacher_design(n_students: int = 6, noise: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """4 teachers crossed with students; the gain has a teacher effect (-3, -1, 1, 3) that happens to
    follow the teachers' accuracies (60, 70, 80, 90): a 1-in-24 coincidence of 4 units, not 24 pairs."""
    rng = np.random.default_rng(seed)
    effect = {"T1": -3.0, "T2": -1.0, "T3": 1.0, "T4": 3.0}
    accuracy = {"T1": 60.0, "T2": 70.0, "T3": 80.0, "T4": 90.0}
    rows = [{"teacher": t, "student": f"S{j}", "teacher_accuracy": accuracy[t],
             "improvement": effect[t] + rng.normal(0, noise)} for j in range(n_students) for t in effect]
    return pd.DataFrame(rows)


def test_a_shared_teacher_effect_is_four_units_not_twenty_four_pairs():
    d = shared_teacher_design()
    within = st.permutation_spearman(d["teacher_accuracy"], d["improvement"], d["student"], n_resamples=999)
    assert within["pvalue"] < 0.01  # the old test: pairs permuted within students
    res = teacher_permutation_spearman(d["teacher_accuracy"], d["improvement"], d["teacher"], d["student"],
                                       teacher_level=True)
    # 4! relabellings of the teachers; the identity and the reversal reach |rho|: p = 2 / 24
    assert res["statistic"] == pytest.approx(within["statistic"])
    assert res["pvalue"] == pytest.approx(2 / 24) and res["min_pvalue"] == pytest.approx(1 / 24)


def test_pair_level_x_moves_only_within_the_design():
    # unbalanced: S0 and S1 have all three teachers, S2 only T2 and T3: only relabellings that keep
    # every pair inside the design (the identity and T2 <-> T3) are allowed
    pairs = [("T1", "S0"), ("T2", "S0"), ("T3", "S0"), ("T1", "S1"), ("T2", "S1"), ("T3", "S1"), ("T2", "S2"),
             ("T3", "S2")]
    t, s = zip(*pairs)
    res = teacher_permutation_spearman(np.arange(8.0), np.arange(8.0), t, s)
    assert math.isnan(res["pvalue"]) and res["min_pvalue"] == pytest.approx(0.5)
    assert "2 teacher relabelling(s)" in res["note"] and "needs 4 or more teachers" in res["note"]
    # crossed 5 x 5 with x unrelated to y: all 120 relabellings, a p-value on the grid of 1/120
    rng = np.random.default_rng(1)
    t, s = zip(*[(f"T{i}", f"S{j}") for i in range(5) for j in range(5)])
    res = teacher_permutation_spearman(rng.normal(size=25), rng.normal(size=25), t, s)
    assert res["min_pvalue"] == pytest.approx(1 / 120) and (res["pvalue"] * 120) == pytest.approx(
        round(res["pvalue"] * 120))


# ----------------------------------------------------------------------------- methods: students as blocks


def test_friedman_counts_students_not_pairs():
    # method effects that vary by student (3 students favour fkl, one rkl), the same for all of its teachers
    favoured = {"S0": "fkl", "S1": "fkl", "S2": "fkl", "S3": "rkl"}
    rng = np.random.default_rng(2)
    rows = [{"domain": "math", "task": "average", "teacher": f"T{i}", "student": s, "method": m,
             "improvement": (4.0 if m == fav else 0.0) + rng.normal(0, 0.1)}
            for s, fav in favoured.items() for i in range(3) for m in ("fkl", "rkl", "gkd")]
    d = pd.DataFrame(rows)
    pairs = st.friedman_test(d.pivot_table(index=["teacher", "student"], columns="method", values="improvement"))
    students = st.friedman_test(d.pivot_table(index="student", columns="method", values="improvement"))
    assert pairs["pvalue"] < 0.05 and pairs["n"] == 12
    assert students["pvalue"] > 0.05 and students["n"] == 4
    tests = st.study_hypothesis_tests(d.assign(teacher_accuracy=np.nan, student_size=np.nan), n_resamples=999)
    row = tests[tests["hypothesis"] == "H1_method_friedman"].iloc[0]
    assert row["n"] == 4 and row["unit"].startswith("students")


# ----------------------------------------------------------------------------- H3 against SFT accuracy


def h3_results(base: bool, spare_seed: bool = False) -> pd.DataFrame:
    rows = []
    for j, acc in enumerate([40.0, 45.0, 50.0, 55.0, 60.0]):
        s = f"S{j}"
        runs = [(f"{s}-sft", "student", "sft", "", 0.0, acc), (f"{s}-fkl", "student", "fkl", "T", 0.0, acc + 5 - j)]
        if base:
            runs.append((f"{s}-base", "base", "", "", 0.0, acc - 10))
        if spare_seed:
            runs.append((f"{s}-sft-1", "student", "sft", "", 1.0, acc + 1))
        rows += [{"study": "x", "run_id": r, "role": role, "model": s, "teacher": t, "method": m, "temperature":
                  1.0 if m == "fkl" else math.nan, "noise_sigma": 0.0, "seed": seed, "task": "gsm8k", "domain": "math",
                  "n": 100.0, "correct": a, "accuracy": a, "ci_low": math.nan, "ci_high": math.nan}
                 for r, role, m, t, seed, a in runs]
    rows.append({**rows[0], "run_id": "T", "role": "teacher", "model": "T", "method": "sft", "accuracy": 80.0,
                 "correct": 80.0, "temperature": math.nan})
    return st.validate_results(pd.DataFrame(rows), "h3")


@pytest.mark.parametrize("base, spare, source", [(True, False, "untuned base model"),
                                                 (False, True, "SFT seed(s) not used as a KD baseline")])
def test_h3_sft_uses_an_accuracy_measured_apart_from_the_gain(base, spare, source):
    results = h3_results(base, spare)
    improvements = st.independent_sft_accuracy(results, st.improvement_table(results, temperature="mean"))
    assert set(improvements["sft_independent_source"]) == {source}
    tests = st.study_hypothesis_tests(improvements, n_resamples=999)
    row = tests[(tests["hypothesis"] == "H3_student_sft") & (tests["task"] == "average")
                & (tests["method"] == "all")].iloc[0]
    # weaker students gain more here by construction (gain 5 - j): rho -1, one-sided exact p 1/5!
    assert row["statistic"] == pytest.approx(-1.0) and row["pvalue"] == pytest.approx(1 / 120)
    assert row["alternative"] == "less"


def test_h3_sft_without_an_independent_accuracy_is_not_testable_and_says_what_would_do():
    results = h3_results(base=False)
    improvements = st.independent_sft_accuracy(results, st.improvement_table(results, temperature="mean"))
    assert improvements["sft_accuracy_independent"].isna().all()
    tests = st.study_hypothesis_tests(improvements, n_resamples=999)
    rows = tests[tests["hypothesis"] == "H3_student_sft"]
    assert len(rows) and rows["pvalue"].isna().all()
    assert rows["note"].str.contains("untuned base model").all() and rows["note"].str.contains("second SFT seed").all()


# ----------------------------------------------------------------------------- H4: agreement beyond difficulty


def test_error_consistency_beyond_item_difficulty_does_not_rise_with_accuracy():
    """Logistic items, no copying: plain error consistency rises as the student's accuracy goes from
    50% to 56.5%; the stratified one stays at 0 (items stratified by their true difficulty)."""
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1.5, 4000)
    teacher = rng.random(4000) < 1 / (1 + np.exp(-(1.0 - difficulty)))
    plain, stratified = {}, {}
    for ability in (0.0, 0.3):
        values = [(fd.error_consistency(teacher, s), fd.stratified_error_consistency(teacher, s, difficulty))
                  for s in rng.random((20, 4000)) < 1 / (1 + np.exp(-(ability - difficulty)))]
        plain[ability], stratified[ability] = np.mean(values, axis=0)
    assert plain[0.0] > 0.2 and plain[0.3] - plain[0.0] > 0.01
    assert abs(stratified[0.0]) < 0.02 and abs(stratified[0.3] - stratified[0.0]) < 0.01
    # copying the teacher's outcome on a third of the items is still seen
    copied = np.where(rng.random(4000) < 1 / 3, teacher, rng.random(4000) < 1 / (1 + np.exp(difficulty)))
    assert fd.stratified_error_consistency(teacher, copied, difficulty) > 0.2


# ----------------------------------------------------------------------------- verdicts: directions and families


def verdict_rows(**pvalues) -> pd.DataFrame:
    rows = []
    for hypothesis, (p, estimate) in pvalues.items():
        rows.append({"domain": "math", "hypothesis": hypothesis, "method": "all", "task": "average", "pvalue": p,
                     "estimate": estimate, "ci_low": math.nan, "ci_high": math.nan, "power": 0.9, "n": 6,
                     "note": "" if not math.isnan(p) else "not testable: by design"})
    return pd.DataFrame(rows)


def test_h3_claims_a_direction_and_holm_runs_over_the_testable_primaries():
    tests = verdict_rows(H1_improvement_ttest=(0.02, 4.0), H3_student_size=(0.001, 0.9),
                         H2_teacher_performance=(math.nan, math.nan), H1_method_friedman=(0.01, 0.5))
    v = st.verdict_table(tests).set_index("hypothesis")
    # a significant positive rho is the opposite of the paper's claim (smaller students gain more)
    assert v.loc["H3_student_size", "verdict"] == "not supported"
    assert "opposite direction" in v.loc["H3_student_size", "reason"]
    # H2 is not testable by design and leaves the family: Holm over H1 and H3 size only
    assert v.loc["H1_improvement_ttest", "pvalue_holm"] == pytest.approx(0.02)  # max(2 x 0.001, 1 x 0.02)
    assert v.loc["H3_student_size", "pvalue_holm"] == pytest.approx(0.002)
    assert v.loc["H1_improvement_ttest", "family"] == "primary"
    # the method comparison is secondary: its own Holm, apart from the primaries
    assert v.loc["H1_method_friedman", "family"] == "secondary"
    assert v.loc["H1_method_friedman", "pvalue_holm"] == pytest.approx(0.01)
    # a smaller pre-registered family changes Holm, and an unknown id is refused
    only = st.verdict_table(tests, primaries=("H1_improvement_ttest",)).set_index("hypothesis")
    assert only.loc["H3_student_size", "family"] == "secondary"
    with pytest.raises(ValueError, match="unknown primary hypothesis 'H9'"):
        st.verdict_table(tests, primaries=("H9",))


# ----------------------------------------------------------------------------- what a design can test


def test_design_testability_names_the_change():
    crossed = pd.DataFrame([(f"T{i}", f"S{j}") for i in range(3) for j in range(3)], columns=["teacher", "student"])
    table = st.design_testability(crossed, 3).set_index("hypothesis")
    assert not table.loc["H1_improvement_ttest", "testable"]
    assert table.loc["H1_improvement_ttest", "needs"] == "5 or more students"
    assert table.loc["H2_teacher_performance", "min_pvalue"] == pytest.approx(1 / 6)
    assert table.loc["H1_method_friedman", "testable"]  # 1 / 6^2 = 0.028
    five = pd.DataFrame([(f"T{i}", f"S{j}") for i in range(5) for j in range(5)], columns=["teacher", "student"])
    table = st.design_testability(five, 3, independent_sft=True).set_index("hypothesis")
    assert table["testable"].all()


# ----------------------------------------------------------------------------- the realistic simulator


def test_scenarios_set_the_expected_accuracy_they_claim():
    design = sim.scenario("realistic, 3 x 3", tasks=(("gsm8k", "math"),), n_examples=4000, temperatures=(1.0,))
    results, store = sim.simulate_study(design, np.random.default_rng(4))
    # every run's observed accuracy is its expected accuracy up to binomial noise (items drawn per study)
    gap = (results["accuracy"] - results["expected_accuracy"]).abs()
    assert gap.max() < 4 * 100 * math.sqrt(0.25 / 4000) + 3.0  # + item sampling of 4000 logistic items
    kd = results[results["method"].isin(["fkl", "rkl", "gkd"])]
    sft = results[results["method"] == "sft"].set_index("model")["expected_accuracy"]
    shift = kd["expected_accuracy"].to_numpy() - sft.loc[kd["model"]].to_numpy()
    assert abs(np.mean(shift)) < 3.0 and np.std(shift) > 1.0  # effects centred, but real
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        sim.scenario("nope")


def test_paper_design_has_its_eleven_pairs():
    design = sim.scenario("realistic, paper design", tasks=(("gsm8k", "math"),), temperatures=(1.0,),
                          methods=("fkl",), predictions=False)
    results, _ = sim.simulate_study(design, np.random.default_rng(5))
    pairs = results[results["method"] == "fkl"][["teacher", "model"]].drop_duplicates()
    assert len(pairs) == 11 and pairs.groupby("model").size().sort_values().tolist() == [1, 1, 1, 2, 3, 3]
