"""The valid study-mode procedure: unit tests, Friedman, stratified permutation Spearman, the split,
verdicts, and the paper re-analysis."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from study_fixtures import write_study

from kd_utils import statistics as st
from kd_utils.predictions import Predictions
from kd_utils.statistics.hypothesis_tests import H3_SFT_NOT_TESTABLE

PAPER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kd-paper-results"


# ----------------------------------------------------------------------------- building blocks


def test_unit_ttest_matches_scipy():
    y = np.array([1.0, 4.0, 2.5, -0.5, 3.0])
    res = st.unit_ttest(y, "greater")
    ref = stats.ttest_1samp(y, 0.0, alternative="greater")
    ci = stats.ttest_1samp(y, 0.0).confidence_interval(0.95)
    assert (res["statistic"], res["pvalue"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert (res["ci_low"], res["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert res["estimate"] == pytest.approx(2.0) and res["n"] == 5
    two = st.unit_ttest(y, "two-sided")
    assert two["pvalue"] == pytest.approx(stats.ttest_1samp(y, 0.0).pvalue)
    # power for a 3-point gain at the observed spread, as statsmodels computes it
    from statsmodels.stats.power import TTestPower
    assert res["power"] == pytest.approx(TTestPower().power(3 / y.std(ddof=1), nobs=5, alpha=0.05,
                                                            alternative="larger"))
    assert st.unit_ttest([1.0, 2.0])["note"] == "not testable: 2 unit(s) < 3"
    assert st.unit_ttest([2.0, 2.0, 2.0])["note"].startswith("not testable: constant")


def test_unit_ttest_defaults_edges_and_not_testable_rows():
    from statsmodels.stats.power import TTestPower

    y = np.array([1.0, 4.0, 2.5, -0.5, 3.0])
    # one-sided by default; two-sided power for the 3-point gain
    assert st.unit_ttest(y)["pvalue"] == pytest.approx(stats.ttest_1samp(y, 0.0, alternative="greater").pvalue)
    two = st.unit_ttest(y, "two-sided", alpha=0.1)
    assert two["power"] == pytest.approx(TTestPower().power(3 / y.std(ddof=1), nobs=5, alpha=0.1,
                                                            alternative="two-sided"))
    # a not-testable result still has every key, NaN where undefined, so table columns never go missing
    short = st.unit_ttest([1.0, 2.0, None])  # None reads as a missing unit
    assert short.keys() == {"statistic", "pvalue", "n", "estimate", "ci_low", "ci_high", "power", "note"}
    assert (short["n"], short["estimate"], short["note"]) == (2, 1.5, "not testable: 2 unit(s) < 3")
    assert all(math.isnan(short[k]) for k in ("statistic", "pvalue", "ci_low", "ci_high", "power"))
    # zero variance means within 1e-9 of the first unit, whatever the size of the values
    assert st.unit_ttest([2.0, 2.0 + 5e-10, 2.0 + 0.9e-9])["note"] == "not testable: constant values (zero variance)"
    for values in ([1000.0, 1000.001, 1000.003], [2.0, 2.0 + 5e-9, 2.0 + 9e-9], [0.0, 0.8e-9, 1.6e-9]):
        res = st.unit_ttest(values)
        ref = stats.ttest_1samp(values, 0.0, alternative="greater")
        assert res["note"] == "" and res["statistic"] == pytest.approx(ref.statistic, rel=1e-6), values


def test_friedman_defaults_and_not_testable_rows():
    table = pd.DataFrame({"fkl": [1.0, 2.0, 3.0, 4.0], "rkl": [2.0, 1.0, 5.0, 6.0], "gkd": [3.0, 4.0, 4.0, 5.0]})
    res = st.friedman_test(table)
    # repeated-measures F power for Cohen's f = 0.25: 4 blocks of 3, df 2 and 6, noncentrality 4 * 3 * f^2
    for alpha in (0.05, 0.1):
        power = stats.ncf.sf(stats.f.ppf(1 - alpha, 2, 6), 2, 6, 4 * 3 * 0.25**2)
        assert st.friedman_test(table, alpha=alpha)["power"] == pytest.approx(power)
    assert res["power"] == pytest.approx(stats.ncf.sf(stats.f.ppf(0.95, 2, 6), 2, 6, 4 * 3 * 0.25**2))  # alpha 0.05
    assert res["note"] == ""
    assert res["statistic"] == pytest.approx(stats.friedmanchisquare(*table.to_numpy().T).statistic)
    short = st.friedman_test(table.iloc[:2])
    assert short.keys() == {"statistic", "pvalue", "n", "estimate", "ci_low", "ci_high", "power", "note",
                            "pvalue_asymptotic", "min_pvalue"}
    assert (short["n"], short["note"]) == (2, "not testable: 3 method(s), 2 complete block(s) (needs 2 and 3)")
    assert all(math.isnan(short[k]) for k in ("statistic", "pvalue", "estimate", "ci_low", "ci_high",
                                              "pvalue_asymptotic"))


def test_friedman_small_designs_and_monte_carlo_p():
    # two methods are enough: ranks 2,2,2,1 vs 1,1,1,2, chi2 = 12 / (4 * 2 * 3) * (7^2 + 5^2) - 3 * 4 * 3 = 1
    two_methods = pd.DataFrame({"fkl": [2.0, 3.0, 4.0, 1.0], "rkl": [1.0, 2.0, 3.0, 5.0]})
    two = st.friedman_test(two_methods, alpha=0.2)
    assert two["note"] == "" and two["statistic"] == pytest.approx(1.0)
    # but at 0.05: 4 blocks of 2 methods bottom out at p = 1 / 2^3 (relabelling every block alike changes nothing)
    gated = st.friedman_test(two_methods)
    assert math.isnan(gated["pvalue"]) and gated["min_pvalue"] == pytest.approx(0.125)
    assert gated["note"] == ("not testable: 4 block(s) of 2 methods allow a smallest p of 0.125 > 0.05; needs more "
                             "blocks (students)")
    # three blocks are enough
    table = pd.DataFrame({"fkl": [1.0, 2.0, 3.0], "rkl": [2.0, 1.0, 5.0], "gkd": [3.0, 4.0, 4.0]})
    assert st.friedman_test(table)["statistic"] == pytest.approx(stats.friedmanchisquare(*table.to_numpy().T).statistic)
    tied = st.friedman_test(pd.DataFrame({"fkl": [1.0, 2.0, 3.0], "rkl": [1.0, 2.0, 3.0]}), alpha=1.0)
    assert tied["note"] == "not testable: every block ties all methods" and math.isnan(tied["statistic"])
    # equal rank sums: chi2 = 0, every resample reaches it, so p = (9 + 1) / (9 + 1) exactly
    balanced = pd.DataFrame({"fkl": [1.0, 2.0, 3.0], "rkl": [2.0, 3.0, 1.0], "gkd": [3.0, 1.0, 2.0]})
    res = st.friedman_test(balanced, n_resamples=9, alpha=1.0)  # 9 resamples cannot reach below 0.1
    assert res["statistic"] == pytest.approx(0.0, abs=1e-12) and res["pvalue"] == 1.0


def test_permutation_spearman_interval_edges_and_monte_carlo_p():
    # 4 points, n_eff 4: the smallest design with an interval; values spread less than 1
    x, y = [0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.4, 0.3]
    res = st.permutation_spearman(x, y, alpha=1.0)
    rho = stats.spearmanr(x, y).statistic  # 0.6
    half = stats.norm.ppf(0.975) * math.sqrt((1 + rho**2 / 2) / (4 - 3))
    assert (res["ci_low"], res["ci_high"]) == (pytest.approx(math.tanh(math.atanh(rho) - half)),
                                               pytest.approx(math.tanh(math.atanh(rho) + half)))
    assert res["pvalue_asymptotic"] == pytest.approx(stats.spearmanr(x, y).pvalue)
    perfect = st.permutation_spearman([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    assert perfect["statistic"] == pytest.approx(1.0) and perfect["pvalue"] == pytest.approx(2 / 120)
    assert math.isnan(perfect["ci_low"]) and math.isnan(perfect["ci_high"])  # atanh(1) is infinite
    # rho = 0 exactly: every resample reaches it, so the Monte Carlo p is (10 + 1) / (10 + 1)
    zero = st.permutation_spearman([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 1.0, 3.0], n_resamples=10, alpha=1.0)
    assert zero["statistic"] == pytest.approx(0.0, abs=1e-12) and zero["pvalue"] == 1.0


def test_monte_carlo_p_values_are_reproducible():
    # seeded: the same call gives the same Monte Carlo p-values (a report must not change on re-running);
    # p-values near 0.5 from hundreds of resamples, so that two unseeded draws would rarely agree
    table = pd.DataFrame({"fkl": [1.0, 2.0, 3.0, 4.0], "rkl": [2.0, 1.0, 5.0, 6.0], "gkd": [3.0, 4.0, 4.0, 5.0]})
    assert st.friedman_test(table, n_resamples=999)["pvalue"] == st.friedman_test(table, n_resamples=999)["pvalue"]
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [3.0, 1.0, 6.0, 2.0, 8.0, 4.0, 5.0, 7.0]  # 8! orders
    assert (st.permutation_spearman(x, y, n_resamples=2000)["pvalue"]
            == st.permutation_spearman(x, y, n_resamples=2000)["pvalue"])
    assert (st.spearman_permutation_pvalue(x, y, n_resamples=2000)
            == st.spearman_permutation_pvalue(x, y, n_resamples=2000))
    # and the seed reaches the draws
    assert st.spearman_permutation_pvalue(x, y, n_resamples=2000, seed=5) != st.spearman_permutation_pvalue(
        x, y, n_resamples=2000)
    # 18 pairs within 6 students: 6^6 orders, Monte Carlo with 999 resamples
    imp = pair_improvements(1.0).assign(error_consistency=lambda d: d["improvement"] + d["teacher_accuracy"])
    first = st.study_hypothesis_tests(imp, n_resamples=999)
    pd.testing.assert_frame_equal(first, st.study_hypothesis_tests(imp, n_resamples=999))
    other_seed = st.study_hypothesis_tests(imp, n_resamples=999, seed=5)
    for hypothesis in ("H1_method_friedman",):  # H2 and H4 relabel 3 teachers: exact, and not testable
        rows = first["hypothesis"] == hypothesis
        assert (first.loc[rows, "pvalue"] != other_seed.loc[rows, "pvalue"]).any(), hypothesis


def test_aligned_ranks_treat_differences_below_1e9_as_ties():
    # block centring leaves rounding noise: x values 4e-10 apart are the same value
    y = [2.0, 1.0, 3.0, 4.0]
    res = st.permutation_spearman([1.0, 1.0 + 4e-10, 2.0, 3.0], y, alpha=1.0)
    assert res["statistic"] == pytest.approx(stats.spearmanr([1.0, 1.0, 2.0, 3.0], y).statistic)


def test_friedman_matches_scipy_with_ties():
    table = pd.DataFrame({"fkl": [1.0, 2.0, 3.0, 4.0, 2.0], "rkl": [2.0, 2.0, 5.0, 1.0, 3.0],
                          "gkd": [3.0, 1.0, 4.0, 4.0, 2.0]})
    res = st.friedman_test(table)
    ref = stats.friedmanchisquare(table["fkl"], table["rkl"], table["gkd"])
    assert res["statistic"] == pytest.approx(ref.statistic) and res["pvalue_asymptotic"] == pytest.approx(ref.pvalue)
    # the permutation p-value against a direct enumeration of the 6^5 within-block orders
    import itertools
    ranks = stats.rankdata(table.to_numpy(), axis=1)
    sums = [sum(r[list(p)] for r, p in zip(ranks, perm)) for perm in
            itertools.product(list(itertools.permutations(range(3))), repeat=5)]
    exact = np.mean([np.sum(np.square(s)) >= np.sum(np.square(ranks.sum(axis=0))) - 1e-9 for s in sums])
    assert st.friedman_test(table, n_resamples=100_000)["pvalue"] == pytest.approx(exact, abs=0.006)  # 4 SE
    assert res["estimate"] == pytest.approx(ref.statistic / (5 * 2))  # Kendall's W
    # incomplete blocks are dropped; too few blocks are not testable
    assert st.friedman_test(table.assign(gkd=[3.0, np.nan, np.nan, np.nan, 2.0]))["note"].startswith("not testable")


def test_permutation_spearman_exact_without_blocks():
    assert st.spearman_permutation_pvalue([1, 2, 3], [1, 2, 3]) == pytest.approx(1 / 3)  # 2 of 6 pairings
    assert st.spearman_permutation_pvalue([1, 2, 3], [1, 3, 2]) == pytest.approx(1.0)
    assert math.isnan(st.spearman_permutation_pvalue([1, 1, 1], [1, 2, 3]))
    # 6 points, exact over 720 pairings: matches a direct enumeration
    import itertools
    x, y = np.array([0.5, 1.5, 3.0, 7.0, 1.0, 3.5]), np.array([5.0, 4.0, 3.5, -1.0, 6.0, 2.0])
    rho = stats.spearmanr(x, y).statistic
    perms = [stats.spearmanr(x, np.array(p)).statistic for p in itertools.permutations(y)]
    expected = np.mean(np.abs(perms) >= abs(rho) - 1e-12)
    res = st.permutation_spearman(x, y)
    assert res["statistic"] == pytest.approx(rho) and res["pvalue"] == pytest.approx(expected)
    # 3 points: the smallest attainable p is 1/3, so the test is reported as not testable at 0.05
    assert st.permutation_spearman([1, 2, 3], [1, 2, 3])["note"].startswith("not testable: 3 points allow 6")


def test_permutation_spearman_within_blocks_ignores_block_shifts():
    rng = np.random.default_rng(0)
    blocks = np.repeat(["s1", "s2", "s3"], 3)
    x = np.tile([60.0, 70.0, 80.0], 3) + rng.normal(0, 1, 9)
    y = rng.normal(0, 1, 9)
    base = st.permutation_spearman(x, y, blocks)
    # a constant per block (a student's shared SFT baseline) changes nothing
    shifted = st.permutation_spearman(x, y + np.repeat([-30.0, 5.0, 40.0], 3), blocks)
    assert shifted["pvalue"] == base["pvalue"] and shifted["statistic"] == pytest.approx(base["statistic"])
    # exact: 3!^3 = 216 within-block permutations, p a multiple of 1/216
    assert base["pvalue"] * 216 == pytest.approx(round(base["pvalue"] * 216))
    single = st.permutation_spearman([1.0, 2.0], [1.0, 2.0], ["a", "b"])
    assert single["note"].startswith("not testable: 0 point(s) in blocks of 2 or more")


def aligned_rank_rho(x: np.ndarray, y: np.ndarray, blocks: np.ndarray) -> float:
    """The docstring's statistic, written out: values minus block means, midranks over all points (to 1e-9),
    centred within blocks, correlated."""
    frame = pd.DataFrame({"x": x, "y": y, "block": blocks})
    centred = []
    for col in ("x", "y"):
        aligned = frame[col] - frame.groupby("block")[col].transform("mean")
        ranks = pd.Series(stats.rankdata(aligned.round(9)), index=frame.index)
        centred.append((ranks - ranks.groupby(frame["block"]).transform("mean")).to_numpy())
    rx, ry = centred
    return float(rx @ ry / math.sqrt((rx @ rx) * (ry @ ry)))


def test_permutation_spearman_pairs_as_blocks():
    rng = np.random.default_rng(7)
    blocks = np.repeat([f"s{i}" for i in range(6)], 2)
    x, y = rng.normal(0, 1, 12), rng.normal(0, 1, 12) + np.repeat(rng.normal(0, 5, 6), 2)
    # points without x or y (None reads as missing) and a block of one point are left out
    res = st.permutation_spearman(list(x) + [1.0, None, 2.0], list(y) + [None, 1.0, 3.0],
                                  list(blocks) + ["s0", "s1", "lone"])
    rho = aligned_rank_rho(x, y, blocks)
    swaps = itertools.product([False, True], repeat=6)  # every within-pair order of x: 2^6
    permuted = [aligned_rank_rho(np.where(np.repeat(swap, 2), x.reshape(6, 2)[:, ::-1].ravel(), x), y, blocks)
                for swap in swaps]
    n_eff = 6 * (2 - 1) + 1
    half = stats.norm.ppf(0.975) * math.sqrt((1 + rho**2 / 2) / (n_eff - 3))
    shift, z = math.atanh(0.3) * math.sqrt(n_eff - 3), stats.norm.ppf(0.975)
    assert res["n"] == 12 and res["note"] == ""
    assert res["statistic"] == pytest.approx(rho) and res["estimate"] == pytest.approx(rho)
    assert res["pvalue"] == pytest.approx(np.mean(np.abs(permuted) >= abs(rho) - 1e-12))
    assert (res["ci_low"], res["ci_high"]) == (pytest.approx(math.tanh(math.atanh(rho) - half)),
                                               pytest.approx(math.tanh(math.atanh(rho) + half)))
    assert res["power"] == pytest.approx(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))
    assert res["pvalue_asymptotic"] == pytest.approx(stats.spearmanr(x, y).pvalue)  # pooled, for reference
    # alpha reaches the power
    z10 = stats.norm.ppf(0.95)
    assert st.permutation_spearman(x, y, blocks, alpha=0.1)["power"] == pytest.approx(
        stats.norm.sf(z10 - shift) + stats.norm.cdf(-z10 - shift))


def test_permutation_spearman_exact_up_to_n_resamples_and_its_gate():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    rho = stats.spearmanr(x, y).statistic
    exact = np.mean([abs(stats.spearmanr(x, order).statistic) >= abs(rho) - 1e-12
                     for order in itertools.permutations(y)])
    # 4! = 24 permutations: exact with 24 resamples; the smallest p 2/24 is not above alpha = 2/24
    res = st.permutation_spearman(x, y, n_resamples=24, alpha=2 / 24)
    assert res["note"] == "" and res["pvalue"] == pytest.approx(exact)
    # with 24 resamples too: the gate holds whenever the test would be exact
    for gated in (st.permutation_spearman(x, y, alpha=0.05), st.permutation_spearman(x, y, n_resamples=24, alpha=0.05)):
        assert gated["power"] == 0.0 and math.isnan(gated["statistic"])
        assert gated["note"] == ("not testable: 4 points allow 24 permutations, the smallest attainable p-value "
                                 "is 0.08 > 0.05")
    # not-testable results keep every key, NaN where undefined
    short = st.permutation_spearman([1.0, 2.0], [2.0, 1.0])
    assert short.keys() == {"statistic", "pvalue", "n", "estimate", "ci_low", "ci_high", "power", "note",
                            "pvalue_asymptotic", "min_pvalue"}
    assert (short["n"], short["note"]) == (2, "not testable: 2 point(s) < 3")
    assert all(math.isnan(short[k]) for k in ("statistic", "pvalue", "estimate", "ci_low", "ci_high", "power",
                                              "pvalue_asymptotic"))
    flat = st.permutation_spearman([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                                   ["a", "a", "b", "b", "c", "c"], alpha=1.0)
    assert flat["note"] == "not testable: constant input within every block, rho undefined"
    assert math.isnan(flat["statistic"])


def test_permutation_spearman_within_blocks_size_by_simulation():
    """Under the null with shared per-block noise (the SFT run) the test rejects about 5%."""
    rng = np.random.default_rng(1)
    blocks = np.repeat(np.arange(3), 3)
    x = np.tile([55.0, 70.0, 85.0], 3)
    rejections = []
    for _ in range(400):
        y = rng.normal(0, 1, 9) + np.repeat(rng.normal(0, 5, 3), 3)
        rejections.append(st.permutation_spearman(x, y, blocks)["pvalue"] < 0.05)
    assert 0.02 <= np.mean(rejections) <= 0.08


# ----------------------------------------------------------------------------- split


def test_example_split_halves_ids_whatever_their_order():
    ids = [f"gsm8k-{i}" for i in range(11)]
    a = st.example_split(ids, "gsm8k", seed=3)
    assert a.sum() == 5
    # every task has its own halves, even where two tasks' ids coincide (1 in C(11, 5) = 462 by chance)
    assert not np.array_equal(a, st.example_split(ids, "svamp", seed=3))
    shuffled = ids[::-1]
    assert set(np.array(ids)[a]) == set(np.array(shuffled)[st.example_split(shuffled, "gsm8k", seed=3)])
    assert not np.array_equal(a, st.example_split(ids, "gsm8k", seed=4))


def test_split_counts_examples_and_thinning(tmp_path):
    results = st.load_results(write_study(tmp_path))
    by_examples = st.split_counts(results, tmp_path / "runs", seed=0)
    assert set(by_examples["split"]) == {"examples"}
    merged = by_examples.merge(results, on=["run_id", "task"])
    assert ((merged["n_a"] + merged["n_b"]) == merged["n"]).all()
    assert ((merged["correct_a"] + merged["correct_b"]) == merged["correct"]).all()
    by_counts = st.split_counts(results, None, seed=0)
    assert set(by_counts["split"]) == {"counts"}
    merged = by_counts.merge(results, on=["run_id", "task"])
    assert ((merged["correct_a"] + merged["correct_b"]) == merged["correct"]).all()
    assert ((merged["correct_a"] <= merged["n_a"]) & (merged["correct_b"] <= merged["n_b"])).all()


def test_split_counts_from_predictions_by_hand():
    # svamp (5 examples) comes first in the results and keeps its place; gsm8k has 7: halves of 3 and 4
    correct = {("r1", "svamp"): [1, 0, 1, 1, 0], ("r2", "svamp"): [0, 0, 1, 1, 1],
               ("r1", "gsm8k"): [1, 1, 1, 0, 0, 0, 1], ("r2", "gsm8k"): [0, 1, 0, 1, 0, 1, 1]}
    ids = {"svamp": [f"s{i}" for i in range(5)], "gsm8k": [f"g{i}" for i in range(7)]}
    predictions = Predictions(tables={(run, task): pd.DataFrame({"id": ids[task], "correct": np.array(flags, bool)})
                                      for (run, task), flags in correct.items()})
    results = pd.DataFrame({"run_id": ["r1", "r2", "r1", "r2"], "task": ["svamp", "svamp", "gsm8k", "gsm8k"],
                            "n": [5.0, 5.0, 7.0, 7.0], "correct": [3.0, 3.0, 4.0, 4.0]})
    split = st.split_counts(results, predictions, seed=3)
    expected = []
    for (run, task), flags in correct.items():
        in_a = st.example_split(ids[task], task, seed=3)  # the halves every run of the task shares
        flags = np.array(flags)
        expected.append([run, task, in_a.sum(), flags[in_a].sum(), (~in_a).sum(), flags[~in_a].sum(), "examples"])
    assert split.values.tolist() == expected
    assert split[["n_a", "n_b"]].values.tolist() == [[2, 3], [2, 3], [3, 4], [3, 4]]


def test_split_counts_without_predictions():
    nan = math.nan
    results = pd.DataFrame([("a", "gsm8k", nan, 3.0),  # no n: left out
                            ("b", "gsm8k", 6.0, nan),  # no count: left out
                            ("c", "gsm8k", 2.0, 1.0),  # two examples are enough for halves of one
                            ("d", "gsm8k", 7.0, 4.0)]
                           + [("e", task, 1000.0, 500.0) for task in ("t1", "t2", "t3", "t4")],
                           columns=["run_id", "task", "n", "correct"])
    split = st.split_counts(results, None, seed=0)
    assert split[["run_id", "task", "n_a", "n_b", "split"]].values.tolist() == [
        ["c", "gsm8k", 1, 1, "counts"], ["d", "gsm8k", 3, 4, "counts"]] + [
        ["e", task, 500, 500, "counts"] for task in ("t1", "t2", "t3", "t4")]
    assert (split["correct_a"] + split["correct_b"]).tolist() == [1, 4, 500, 500, 500, 500]
    assert ((split["correct_a"] <= split["n_a"]) & (split["correct_b"] <= split["n_b"])).all()
    # each task of a run gets its own draw (sd about 8 of 500: four equal draws would be a coincidence)
    assert split.loc[split["run_id"] == "e", "correct_a"].nunique() > 1


def test_split_removes_regression_to_the_mean():
    """Under the null (KD = SFT), Spearman(improvement, SFT accuracy) over 6 students is negative on
    average from SFT's own noise; with SFT accuracy on half A and the improvement on half B it is not.
    100 simulated studies, each one 'domain' of a single results table."""
    rng = np.random.default_rng(7)
    records = []
    for study in range(100):
        records.append(dict(run_id=f"T{study}", role="teacher", model="T-7B", method="sft", teacher="",
                            temperature="", domain=f"study{study}", correct=240))
        for j, p in enumerate(np.linspace(0.45, 0.55, 6)):  # close abilities: the noise matters
            student = f"S-{j + 1}B"
            records.append(dict(run_id=f"{student}-sft-{study}", role="student", model=student, method="sft",
                                teacher="", temperature="", domain=f"study{study}", correct=rng.binomial(300, p)))
            records += [dict(run_id=f"{student}-fkl-{t}-{study}", role="student", model=student, method="fkl",
                             teacher="T-7B", temperature=t, domain=f"study{study}", correct=rng.binomial(300, p))
                        for t in (1.0, 2.0, 5.0)]
    table = pd.DataFrame(records).assign(study="s", noise_sigma=0.0, seed=0, task="gsm8k", n=300, ci_low="",
                                         ci_high="")
    results = st.validate_results(table.assign(accuracy=100 * table["correct"] / 300)[list(st.RESULTS_COLUMNS)])
    imp = st.improvement_table(results, temperature="mean")
    imp = st.split_estimates(results, imp, st.split_counts(results, None, seed=0))
    imp = imp[imp["task"] == "gsm8k"].groupby("domain")
    naive = imp.apply(lambda d: stats.spearmanr(d["sft_accuracy"], d["improvement"]).statistic)
    split = imp.apply(lambda d: stats.spearmanr(d["sft_accuracy_a"], d["improvement_b"]).statistic)
    assert naive.mean() < -0.25  # the artefact the issue describes
    assert abs(split.mean()) < 0.12  # 3 standard errors of a mean of 100


def test_selected_temperature_is_chosen_on_half_a(tmp_path):
    results = st.load_results(write_study(tmp_path))
    imp = st.improvement_table(results, temperature="mean")
    split = st.split_counts(results, tmp_path / "runs", seed=0)
    out = st.split_estimates(results, imp, split).set_index(st.KEYS)
    acc = split.assign(a=split["correct_a"] / split["n_a"], b=split["correct_b"] / split["n_b"]).set_index(
        ["run_id", "task"])
    row = out.loc[("math", "teach-1.7B", "stu-360M", "rkl", "gsm8k")]
    a1, a2 = acc.loc[("stu-360M-rkl-t1", "gsm8k"), "a"], acc.loc[("stu-360M-rkl-t2", "gsm8k"), "a"]
    chosen = 1.0 if a1 >= a2 else 2.0
    assert row["selected_temperature"] == chosen
    expected = 100 * (acc.loc[(f"stu-360M-rkl-t{chosen:g}", "gsm8k"), "b"] - acc.loc[("stu-360M-sft", "gsm8k"), "b"])
    assert row["improvement_selected"] == pytest.approx(expected)
    assert row["sft_accuracy_a"] == pytest.approx(100 * acc.loc[("stu-360M-sft", "gsm8k"), "a"])


# ----------------------------------------------------------------------------- the valid tests


def pair_improvements(effect: float, n_students: int = 6, n_teachers: int = 3, seed: int = 0) -> pd.DataFrame:
    """A mean-temperature improvement table: every pair's improvement = effect + noise, shared per student."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n_students):
        shared = rng.normal(0, 1)
        for i in range(n_teachers):
            for method in ("fkl", "rkl", "gkd"):
                for task in ("gsm8k", "svamp", "average"):
                    rows.append(dict(domain="math", teacher=f"T{i}-{7 * (i + 1)}B", student=f"S{j}-{j + 1}B",
                                     method=method, task=task, temperature=math.nan,
                                     improvement=effect + shared + rng.normal(0, 0.5),
                                     teacher_accuracy=60 + 10 * i + rng.normal(0, 0.1), student_size=j + 1.0))
    return pd.DataFrame(rows)


def sign_flip_by_hand(values: np.ndarray) -> float:
    """One-sided exact sign-flip p-value: the share of the 2^n sign patterns whose sum reaches the observed one."""
    patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=len(values))))
    return float(np.mean(patterns @ np.asarray(values) >= np.sum(values) - 1e-9))


def test_h1_units_are_students():
    imp = pair_improvements(5.0)
    tests = st.study_hypothesis_tests(imp, n_resamples=999)
    row = tests[(tests["hypothesis"] == "H1_improvement_ttest") & (tests["method"] == "all")
                & (tests["task"] == "average")].iloc[0]
    units = imp[imp["task"] == "average"].groupby("student")["improvement"].mean()
    assert row["n"] == 6 and row["unit"] == "students"
    assert row["pvalue"] == pytest.approx(sign_flip_by_hand(units.to_numpy()))
    assert row["estimate"] == pytest.approx(units.mean()) and row["min_pvalue"] == pytest.approx(1 / 64)
    friedman = tests[(tests["hypothesis"] == "H1_method_friedman") & (tests["task"] == "average")].iloc[0]
    assert friedman["n"] == 6  # students are the blocks
    h2 = tests[(tests["hypothesis"] == "H2_teacher_performance") & (tests["method"] == "all")
               & (tests["task"] == "average")].iloc[0]
    # three teachers are three units, whatever the number of pairs: 3! relabellings cannot reach 0.05
    assert h2["n"] == 18 and "the teachers are the units" in h2["unit"] and math.isnan(h2["pvalue"])
    assert h2["note"].startswith("not testable: 3 teachers allow 6 teacher relabelling(s)")
    h3 = tests[(tests["hypothesis"] == "H3_student_size") & (tests["method"] == "all")
               & (tests["task"] == "average")].iloc[0]
    units = imp[imp["task"] == "average"].groupby("student")[["student_size", "improvement"]].mean()
    assert h3["n"] == 6 and h3["statistic"] == pytest.approx(stats.spearmanr(units["student_size"],
                                                                             units["improvement"]).statistic)
    assert h3["alternative"] == "less"
    assert (tests["pvalue_holm"].dropna() >= tests["pvalue"].dropna().loc[tests["pvalue_holm"].dropna().index]).all()


def holm_by_hand(pvalues: pd.Series) -> list[float]:
    """Holm's step-down: the i-th smallest p times (m - i), running maximum, capped at 1 (statsmodels runs
    gc.collect() on every call, 0.07 s each)."""
    p = pvalues.to_numpy(float)
    order = np.argsort(p)
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (p.size - np.arange(p.size))))
    return stepped[np.argsort(order)].tolist()


def exact_friedman_pvalue(wide: pd.DataFrame) -> float:
    """P(permuted rank sums' squares >= observed) over every within-block order of the ranks."""
    ranks = stats.rankdata(wide.to_numpy(float), axis=1)
    orders = np.array(list(itertools.permutations(range(ranks.shape[1]))))
    sums = ranks[0][orders]
    for block in ranks[1:]:
        sums = (sums[:, None, :] + block[orders][None, :, :]).reshape(-1, ranks.shape[1])
    return float(np.mean(np.square(sums).sum(axis=1) >= np.square(ranks.sum(axis=0)).sum() - 1e-9))


def test_study_hypothesis_tests_rows_match_scipy_and_statsmodels():
    from statsmodels.stats.power import TTestPower

    # 5 students x 2 teachers x 3 methods; commonsense has no split (no selected temperature) and a task
    # without any improvement (piqa); no SFT accuracy measured apart from the gains
    rng = np.random.default_rng(5)
    rows = []
    for domain, tasks in (("math", ("gsm8k", "average")), ("commonsense", ("boolq", "piqa", "average"))):
        for j in range(5):
            for i in range(2):
                for method in ("fkl", "rkl", "gkd"):
                    for task in tasks:
                        rows.append(dict(
                            domain=domain, teacher=f"T{i}", student=f"S{j}", method=method, task=task,
                            temperature=math.nan,
                            improvement=math.nan if task == "piqa" else 2.0 * j + rng.normal(0, 2),
                            improvement_selected=rng.normal(4, 2) if domain == "math" else math.nan,
                            teacher_accuracy=60.0 + 10 * i, student_size=j + 1.0,
                            error_consistency_stratified=rng.normal(0.3, 0.1), agreement=rng.normal(0.7, 0.1),
                            bleu=rng.normal(20, 5)))
    imp = pd.DataFrame(rows)
    tests = st.study_hypothesis_tests(imp)
    assert list(tests.columns) == list(st.STUDY_TEST_COLUMNS)
    # math first; H3 against SFT accuracy is listed as not testable, H5 (BLEU) is tested in math only
    assert tests["domain"].tolist() == sorted(tests["domain"], key=["math", "commonsense"].index)
    h2_to_h4 = ["H2_teacher_performance", "H3_student_size", "H3_student_sft", "H4_agreement"]
    assert tests.groupby("domain", sort=False)["hypothesis"].unique().map(list).to_dict() == {
        "math": ["H1_improvement_ttest", "H1_method_friedman", *h2_to_h4, "H5_fidelity"],
        "commonsense": ["H1_improvement_ttest", "H1_method_friedman", *h2_to_h4]}
    sft = tests[tests["hypothesis"] == "H3_student_sft"]
    assert sft["pvalue"].isna().all() and (sft["note"] == H3_SFT_NOT_TESTABLE).all()

    h1 = tests[tests["hypothesis"] == "H1_improvement_ttest"]
    assert (h1["unit"] == "students").all() and h1["test"].str.startswith("exact sign-flip test").all()
    assert (h1["effect_of_interest"] == "a 3-point gain").all() and (h1["alternative"] == "greater").all()
    assert len(h1) == 4 * 2 + 4 * 3  # methods all, fkl, rkl, gkd x tasks
    for row in h1.to_dict("records"):
        part = imp[(imp["domain"] == row["domain"]) & (imp["task"] == row["task"])
                   & ((imp["method"] == row["method"]) | (row["method"] == "all"))]
        if row["task"] == "piqa":
            assert row["n"] == 0 and row["note"].startswith("not testable: 0 student(s)") and math.isnan(row["pvalue"])
            continue
        units = part.groupby("student")["improvement"].mean()
        power = TTestPower().power(3 / units.std(ddof=1), nobs=5, alpha=0.05, alternative="larger")
        assert row["n"] == 5 and row["estimate"] == pytest.approx(units.mean())
        assert row["pvalue"] == pytest.approx(sign_flip_by_hand(units.to_numpy()))
        assert row["power"] == pytest.approx(power)
        assert row["note"] == ("" if power >= 0.8 else
                               f"underpowered: 5 students, power {power:.2f} for a 3-point gain")
        if row["domain"] == "math":  # H1 on the selected-temperature estimate, students as units
            selected = part.groupby("student")["improvement_selected"].mean()
            assert row["pvalue_selected"] == pytest.approx(sign_flip_by_hand(selected.to_numpy()))
        else:
            assert math.isnan(row["pvalue_selected"])
    for _, family in tests.groupby(["domain", "hypothesis", "method"]):  # Holm across the tasks
        tested = family.dropna(subset=["pvalue"])
        if len(tested):
            assert tested["pvalue_holm"].tolist() == pytest.approx(holm_by_hand(tested["pvalue"]))

    friedman = tests[tests["hypothesis"] == "H1_method_friedman"]
    assert (friedman["method"] == "all").all() and friedman["unit"].str.startswith("students (blocks").all()
    assert (friedman["test"] == "Friedman test, permutation p (estimate: Kendall's W)").all()
    assert (friedman["effect_of_interest"] == "Cohen's medium f = 0.25").all()
    # repeated-measures F power for f = 0.25 with 5 blocks of 3: df 2 and 8, noncentrality 5 * 3 * f^2
    power = stats.ncf.sf(stats.f.ppf(0.95, 2, 8), 2, 8, 5 * 3 * 0.25**2)
    for row in friedman.to_dict("records"):
        if row["task"] == "piqa":
            assert row["n"] == 0 and row["note"] == "not testable: 0 method(s), 0 complete block(s) (needs 2 and 3)"
            continue
        part = imp[(imp["domain"] == row["domain"]) & (imp["task"] == row["task"])]
        wide = part.pivot_table(index="student", columns="method", values="improvement")
        ref = stats.friedmanchisquare(*wide.to_numpy().T)
        assert row["n"] == 5 and row["statistic"] == pytest.approx(ref.statistic)
        assert row["pvalue_asymptotic"] == pytest.approx(ref.pvalue) and row["power"] == pytest.approx(power)
        assert row["pvalue"] == pytest.approx(exact_friedman_pvalue(wide), abs=0.02)  # 9999 resamples: 4 SE
        assert row["note"] == ("" if power >= 0.8 else
                               f"underpowered: 5 students, power {power:.2f} for Cohen's medium f = 0.25")

    h4 = tests[tests["hypothesis"] == "H4_agreement"]
    assert (h4["test"] == "Spearman of improvement with error_consistency_stratified, permutation p").all()
    # 2 teachers: 2 relabellings, the smallest p 0.5
    assert h4.loc[h4["task"] != "piqa", "note"].str.startswith(
        "not testable: 2 teachers allow 2 teacher relabelling(s), smallest p 0.5 > 0.05").all()
    assert h4.loc[h4["task"] == "piqa", "note"].str.startswith("not testable: 0 pair(s)").all()
    # another agreement measure and alpha: H4 reads that column, the powers use that alpha
    other = st.study_hypothesis_tests(imp[imp["domain"] == "math"], agreement="agreement", alpha=0.1, n_resamples=99)
    h4 = other[other["hypothesis"] == "H4_agreement"]
    assert (h4["test"] == "Spearman of improvement with agreement, permutation p").all()
    assert h4["note"].str.startswith("not testable: 2 teachers allow 2 teacher relabelling(s), smallest p 0.5 > 0.1"
                                     ).all()
    row = other[(other["hypothesis"] == "H1_improvement_ttest") & (other["method"] == "all")
                & (other["task"] == "gsm8k")].iloc[0]
    units = imp[(imp["domain"] == "math") & (imp["task"] == "gsm8k")].groupby("student")["improvement"].mean()
    assert row["power"] == pytest.approx(TTestPower().power(3 / units.std(ddof=1), nobs=5, alpha=0.1,
                                                            alternative="larger"))


def verdict_of(tests: pd.DataFrame, hypothesis: str) -> str:
    verdicts = st.verdict_table(tests)
    return verdicts.set_index("hypothesis").loc[hypothesis, "verdict"]


def test_verdicts_from_the_numbers():
    # a large effect over 6 students: supported
    assert verdict_of(st.study_hypothesis_tests(pair_improvements(5.0), n_resamples=999),
                      "H1_improvement_ttest") == "supported"
    # no effect, tiny spread: the interval excludes a 3-point gain
    small = pair_improvements(0.0).assign(improvement=lambda d: d["improvement"] * 0.1)
    assert verdict_of(st.study_hypothesis_tests(small, n_resamples=999), "H1_improvement_ttest") == "not supported"
    # no effect, spread as large as the gain with 5 students: underpowered
    wide = pair_improvements(0.0, n_students=5).assign(improvement=lambda d: d["improvement"] * 8)
    assert verdict_of(st.study_hypothesis_tests(wide, n_resamples=999), "H1_improvement_ttest") == "underpowered"
    # four students: not testable by design, with the number that would do
    four = st.verdict_table(st.study_hypothesis_tests(pair_improvements(5.0, n_students=4), n_resamples=999))
    row = four.set_index("hypothesis").loc["H1_improvement_ttest"]
    assert row["verdict"] == "not testable" and "needs 5 students" in row["reason"]
    # without agreement or BLEU measurements those hypotheses are not testable, and say why
    assert four.set_index("hypothesis").loc["H4_agreement", "reason"].startswith("not testable: no agreement")


def test_verdict_inconclusive_when_powered_but_interval_holds_the_effect():
    row = pd.Series({"hypothesis": "H1_improvement_ttest", "pvalue": 0.2, "pvalue_holm": 0.2, "estimate": 1.5,
                     "ci_low": -1.0, "ci_high": 4.0, "power": 0.9, "effect_of_interest": "a 3-point gain",
                     "note": ""})
    assert st.verdicts.verdict(row)[0] == "inconclusive"
    assert st.verdicts.verdict(row.replace({0.9: 0.5}))[0] == "underpowered"
    assert st.verdicts.verdict(row.replace({0.2: 0.001}))[0] == "supported"
    corr = row.copy()
    corr.update({"hypothesis": "H2_teacher_performance", "estimate": 0.05, "ci_low": -0.2, "ci_high": 0.25})
    assert st.verdicts.verdict(corr)[0] == "not supported"  # |rho| = 0.3 ruled out


def test_agreement_gain_tests_units_are_students():
    rows = []
    for j, gain in enumerate([5.0, 7.0, 6.0, 4.0]):
        for i in range(2):
            for task in ("gsm8k", "svamp"):
                rows.append(dict(domain="math", teacher=f"T{i}", student=f"S{j}", task=task, method="sft",
                                 agreement=50.0 + j))
                for method in ("fkl", "rkl"):
                    rows.append(dict(domain="math", teacher=f"T{i}", student=f"S{j}", task=task, method=method,
                                     agreement=50.0 + j + gain + (1 if method == "rkl" else -1)))
    tests = st.agreement_gain_tests(pd.DataFrame(rows), measure="agreement").set_index("task")
    assert tests.loc["average", "n"] == 4 and tests.loc["average", "estimate"] == pytest.approx(5.5)
    assert tests.loc["average", "pvalue"] == pytest.approx(stats.ttest_1samp([5, 7, 6, 4], 0).pvalue)


def test_agreement_gain_tests_rows_match_scipy_and_statsmodels():
    from statsmodels.stats.power import TTestPower

    # KD minus SFT error consistency per (teacher, student, task) is gains[student][task] by construction:
    # teacher offsets are shared by SFT and KD, fkl and rkl sit at +1 and -1 around the gain
    gains = {"math": {"S0": (2.0, 4.0), "S1": (3.0, 1.0), "S2": (7.0, 2.0), "S3": (-1.0, 5.0)},
             "commonsense": {"S0": (4.0,), "S1": (6.0,)}}
    tasks = {"math": ("gsm8k", "svamp"), "commonsense": ("boolq",)}
    rows = []
    for domain, by_student in gains.items():
        for student, per_task in by_student.items():
            for teacher, offset in (("T0", 0.0), ("T1", 10.0)):
                for task, gain in zip(tasks[domain], per_task):
                    base = dict(domain=domain, teacher=teacher, student=student, task=task, bleu=math.nan)
                    rows += [base | dict(method="sft", noise_sigma=0.0, error_consistency=50 + offset),
                             base | dict(method="fkl", noise_sigma=0.0, error_consistency=50 + offset + gain + 1),
                             # a blank sigma is no noise
                             base | dict(method="rkl", noise_sigma=math.nan, error_consistency=50 + offset + gain - 1),
                             # a noisy teacher's run and a missing measure never enter
                             base | dict(method="fkl", noise_sigma=1.0, error_consistency=0.0),
                             base | dict(method="gkd", noise_sigma=0.0, error_consistency=math.nan)]
    tests = st.agreement_gain_tests(pd.DataFrame(rows))  # error consistency is the default measure
    assert list(tests.columns) == list(st.STUDY_TEST_COLUMNS)
    # the study's order: math before commonsense, the tasks in their canonical order, average last
    assert tests[["domain", "task"]].values.tolist() == [
        ["math", "gsm8k"], ["math", "svamp"], ["math", "average"], ["commonsense", "boolq"],
        ["commonsense", "average"]]
    assert (tests["hypothesis"] == "H4_kd_vs_sft").all() and (tests["method"] == "all").all()
    assert (tests["unit"] == "students").all()
    assert (tests["test"] == "two-sided t-test of KD minus SFT error_consistency").all()
    assert (tests["effect_of_interest"] == "Cohen's medium d = 0.5").all()
    for (domain, task), row in tests.set_index(["domain", "task"]).iterrows():
        per_task = np.array(list(gains[domain].values()))
        units = per_task.mean(axis=1) if task == "average" else per_task[:, tasks[domain].index(task)]
        power = TTestPower().power(0.5, nobs=units.size, alpha=0.05, alternative="two-sided")
        assert row["n"] == units.size and row["estimate"] == pytest.approx(units.mean())
        assert row["power"] == pytest.approx(power)
        if units.size < 3:
            assert math.isnan(row["statistic"]) and math.isnan(row["pvalue"]) and math.isnan(row["pvalue_holm"])
            assert row["note"] == "not testable: 2 unit(s) < 3"
            continue
        ref = stats.ttest_1samp(units, 0.0)
        ci = ref.confidence_interval(0.95)
        assert (row["statistic"], row["pvalue"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert row["note"] == f"underpowered: 4 students, power {power:.2f} for Cohen's medium d = 0.5"
    math_rows = tests[tests["domain"] == "math"]
    assert math_rows["pvalue_holm"].tolist() == pytest.approx(holm_by_hand(math_rows["pvalue"]))


# ----------------------------------------------------------------------------- the paper re-analysed


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason=f"paper results not found at {PAPER_DIR}")
def test_paper_reanalysis():
    improvements, tests, verdicts = st.paper_reanalysis(PAPER_DIR, n_resamples=999)
    assert set(improvements["temperature"]) == {1.0}  # no test-set selection
    assert len(verdicts) == 16 and {"published", "paper_conclusion", "survives"} <= set(verdicts.columns)
    h1 = verdicts.set_index(["domain", "hypothesis"]).loc[("math", "H1_improvement_ttest")]
    assert h1["n"] == 6 and h1["paper_conclusion"] == "supported"  # 6 students, not 33 rows
    assert h1["published"].startswith("8.47 (p < 0.001; 33 rows)")
    # the published statistic of the same row is carried beside ours
    published = st.paper_hypothesis_tests(PAPER_DIR)
    row = tests[(tests["hypothesis"] == "H3_student_size") & (tests["method"] == "all") & (tests["task"] == "average")
                & (tests["domain"] == "math")].iloc[0]
    ref = published[(published["hypothesis"] == "H3_student_size") & (published["method"] == "all")
                    & (published["task"] == "average") & (published["domain"] == "math")].iloc[0]
    assert row["published_statistic"] == pytest.approx(ref["statistic"]) and row["published_n"] == 33
    # the published raw agreement rises with accuracy by construction: H4 is not tested on it
    assert not tests["hypothesis"].isin(["H4_agreement", "H4_kd_vs_sft"]).any()
    h4 = verdicts[verdicts["hypothesis"].isin(["H4_agreement", "H4_kd_vs_sft"])]
    assert (h4["verdict"] == "not testable").all() and (h4["reason"] == st.paper.RAW_AGREEMENT_REASON).all()
    # H1 over 6 students: the exact sign-flip p of the students' mean gains; the secondary test is apart
    v = verdicts.set_index(["domain", "hypothesis"])
    assert v.loc[("math", "H1_improvement_ttest"), "pvalue"] == pytest.approx(2 / 64)
    assert v.loc[("math", "H1_method_friedman"), "family"] == "secondary"
    assert v.loc[("math", "H3_student_sft"), "verdict"] == "not testable"


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason=f"paper results not found at {PAPER_DIR}")
def test_paper_sft_counts_reproduce_the_published_accuracies():
    results = st.with_sft_counts(st.load_paper_results(PAPER_DIR))
    sft = results[(results["method"] == "sft") & (results["role"] == "student") & (results["task"] != "average")]
    assert sft["n"].notna().all()
    assert np.allclose((100 * sft["correct"] / sft["n"]).round(2), sft["accuracy"])
    broken = results.copy()
    broken.loc[sft.index[0], "accuracy"] += 0.013
    with pytest.raises(ValueError, match="is no count out of"):
        st.with_sft_counts(broken)
