"""kd_utils.statistics: paper mode on a hand-computed fixture, study mode on synthetic tables."""

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

PAPER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kd-paper-results"
SQRT3 = math.sqrt(3.0)

# Paper-format fixture. Improvements over SFT (pairs Qwen-7B->Qwen-0.5B, Qwen-7B->Qwen-1.5B,
# Llama-8B->Llama-1B) on gsm8k: fkl 1,2,3  rkl 2,4,6  gkd 3,3,6. The 0.5B fkl pair has two
# temperatures (gsm8k best at t=1, SVAMP and Average at t=2) and a task-unaware-teacher run
# whose high accuracies must not enter; the 1.5B fkl run's teacher carries a checkpoint suffix.
PAPER_FIXTURE = {
    "math_results_main.csv": """Teacher,Student,Method,gsm8k,SVAMP,Average
-,Qwen-0.5B,BaseModel,5,6,5.5
-,Qwen-0.5B,SFT,20,30,25
-,Qwen-1.5B,SFT,40,50,45
-,Qwen-7B,SFT,70,80,75
Qwen-7B,Qwen-0.5B,student_KD_temp_1.0,21,31,26
Qwen-7B,Qwen-0.5B,student_KD_temp_2.0,19,33,27
Qwen-7B,Qwen-0.5B,student_KD_base_teacher_temp_1.0,90,90,90
Qwen-7B,Qwen-0.5B,student_RevKD_temp_1.0,22,32,28
Qwen-7B,Qwen-0.5B,student_GKD_temp_1.0,23,34,26
Qwen-7B_ckpt50,Qwen-1.5B,student_KD_temp_1.0,42,51,46
Qwen-7B,Qwen-1.5B,student_RevKD_temp_1.0,44,52,48
Qwen-7B,Qwen-1.5B,student_GKD_temp_1.0,43,55,47
""",
    "llama_math_results.csv": """Teacher,Student,Method,gsm8k,SVAMP,Average
-,Llama-1B,SFT,30,40,35
-,Llama-8B,SFT,60,70,65
Llama-8B,Llama-1B,student_KD_temp_1.0,33,42,39
Llama-8B,Llama-1B,student_RevKD_temp_1.0,36,41,40
Llama-8B,Llama-1B,student_GKD_temp_1.0,36,46,38
""",
    # the llama commonsense file has no Average column: `average` then has the Qwen pairs only
    "cs_results_main.csv": """Teacher,Student,Method,boolq,piqa,Average
-,Qwen-0.5B,SFT,50,60,55
-,Qwen-1.5B,SFT,60,70,65
-,Qwen-7B,SFT,80,85,82.5
Qwen-7B,Qwen-0.5B,student_KD_temp_1.0,51,62,56
Qwen-7B,Qwen-0.5B,student_RevKD_temp_1.0,52,61,57
Qwen-7B,Qwen-0.5B,student_GKD_temp_1.0,51,63,58
Qwen-7B,Qwen-1.5B,student_KD_temp_1.0,62,71,67
Qwen-7B,Qwen-1.5B,student_RevKD_temp_1.0,62,72,68
Qwen-7B,Qwen-1.5B,student_GKD_temp_1.0,63,72,66
""",
    "llama_cs_results.csv": """Teacher,Student,Method,boolq,piqa
-,Llama-1B,SFT,55,65
-,Llama-8B,SFT,75,80
Llama-8B,Llama-1B,student_KD_temp_1.0,59,68
Llama-8B,Llama-1B,student_RevKD_temp_1.0,57,68
Llama-8B,Llama-1B,student_GKD_temp_1.0,60,66
""",
    "EM1.csv": """Teacher,Student,Pair,Method,gsm8k,SVAMP
Qwen-7B,Qwen-0.5B,Qwen-7B -> Qwen-0.5B,SFT,99,1
Qwen-7B,Qwen-0.5B,Qwen-7B -> Qwen-0.5B,KD,50,10
Qwen-7B,Qwen-1.5B,Qwen-7B -> Qwen-1.5B,SFT,1,99
Qwen-7B,Qwen-1.5B,Qwen-7B -> Qwen-1.5B,KD,70,20
Llama-8B,Llama-1B,Llama-8B -> Llama-1B,KD,60,30
""",
    "BLEU.csv": """Teacher,Student,Pair,Method,SVAMP,gsm8k
Qwen-7B,Qwen-0.5B,Qwen-7B -> Qwen-0.5B,KD,5,30
Qwen-7B,Qwen-1.5B,Qwen-7B -> Qwen-1.5B,KD,6,10
Llama-8B,Llama-1B,Llama-8B -> Llama-1B,KD,7,20
""",
    "EM1_cs.csv": """Teacher,Student,Pair,Method,boolq,piqa
Qwen-7B,Qwen-0.5B,Qwen-7B -> Qwen-0.5B,KD,40,50
Qwen-7B,Qwen-1.5B,Qwen-7B -> Qwen-1.5B,KD,41,51
Llama-8B,Llama-1B,Llama-8B -> Llama-1B,KD,42,52
""",
}


def write_paper_fixture(directory: Path, skip: tuple[str, ...] = ()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in PAPER_FIXTURE.items():
        if name not in skip:
            (directory / name).write_text(text)
    return directory


@pytest.fixture
def paper_tests(tmp_path) -> pd.DataFrame:
    # per test, not per module (0.1 s each): mutmut runs for a mutant only the tests that called the
    # mutated function, and a shared fixture's calls are recorded for the first test that used it
    return st.paper_hypothesis_tests(write_paper_fixture(tmp_path / "paper"))


def pick(tests: pd.DataFrame, domain: str, hypothesis: str, method: str, task: str) -> pd.Series:
    rows = tests[(tests["domain"] == domain) & (tests["hypothesis"] == hypothesis)
                 & (tests["method"] == method) & (tests["task"] == task)]
    assert len(rows) == 1, (domain, hypothesis, method, task)
    return rows.iloc[0]


# ----------------------------------------------------------------------------- paper mode


def test_paper_mode_columns_and_rows(paper_tests):
    assert list(paper_tests.columns) == ["domain", "hypothesis", "method", "task", "statistic", "pvalue", "n"]
    counts = paper_tests.groupby(["domain", "hypothesis"]).size().to_dict()
    # math: 3 tasks (gsm8k, svamp, average) x 4 methods; ANOVA all only; H4/H5 without average
    assert counts[("math", "H1_improvement_ttest")] == 12
    assert counts[("math", "H1_method_anova")] == 3
    assert counts[("math", "H3_student_size")] == 12
    assert counts[("math", "H4_agreement")] == 8
    assert counts[("math", "H5_fidelity")] == 8
    assert ("commonsense", "H5_fidelity") not in counts  # BLEU is math only
    assert len(paper_tests) == 67 + 59
    assert set(paper_tests["task"]) == {"gsm8k", "svamp", "average", "boolq", "piqa"}


def test_paper_mode_h1_hand_computed(paper_tests):
    # fkl 1,2,3 and rkl 2,4,6: t = 2*sqrt(3); one-sided p with df=2: 0.5 * (1 - t / sqrt(t^2 + 2))
    p_df2 = 0.5 * (1 - math.sqrt(12) / math.sqrt(14))
    for method in ("fkl", "rkl"):
        row = pick(paper_tests, "math", "H1_improvement_ttest", method, "gsm8k")
        assert row["statistic"] == pytest.approx(2 * SQRT3, rel=1e-12)
        assert row["pvalue"] == pytest.approx(p_df2, rel=1e-10)
        assert row["n"] == 3
    row = pick(paper_tests, "math", "H1_improvement_ttest", "gkd", "gsm8k")  # 3,3,6: mean 4, se 1
    assert row["statistic"] == pytest.approx(4.0, rel=1e-12)
    assert row["pvalue"] == pytest.approx(0.5 * (1 - 4 / math.sqrt(18)), rel=1e-10)
    row = pick(paper_tests, "math", "H1_improvement_ttest", "all", "gsm8k")  # mean 10/3, sd sqrt(3), n 9
    assert row["statistic"] == pytest.approx(10 / SQRT3, rel=1e-12)
    assert row["pvalue"] == pytest.approx(stats.t.sf(10 / SQRT3, 8), rel=1e-10)
    assert row["n"] == 9


def test_paper_mode_anova_hand_computed(paper_tests):
    # groups (1,2,3), (2,4,6), (3,3,6): SSB 8 (df 2), SSW 16 (df 6) -> F = 1.5; F(2, 6) sf = (1 + F/3)^-3
    row = pick(paper_tests, "math", "H1_method_anova", "all", "gsm8k")
    assert row["statistic"] == pytest.approx(1.5, rel=1e-12)
    assert row["pvalue"] == pytest.approx(1.5**-3, rel=1e-10)
    assert row["n"] == 9


def test_paper_mode_spearman_hand_computed(paper_tests):
    # n = 3: rho 0.5 -> p = 2/3; rho -sqrt(3)/2 -> p = 1/3 (t with df 1 is Cauchy)
    teacher = pick(paper_tests, "math", "H2_teacher_performance", "fkl", "gsm8k")  # 70, 70 (ckpt stripped), 60
    assert teacher["statistic"] == pytest.approx(-SQRT3 / 2, rel=1e-12)
    assert teacher["pvalue"] == pytest.approx(1 / 3, rel=1e-10)
    assert teacher["n"] == 3
    for hypothesis in ("H3_student_size", "H3_student_sft", "H4_agreement"):  # ranks 1,3,2 vs 1,2,3
        row = pick(paper_tests, "math", hypothesis, "fkl", "gsm8k")
        assert (row["statistic"], row["n"]) == (pytest.approx(0.5, rel=1e-12), 3), hypothesis
        assert row["pvalue"] == pytest.approx(2 / 3, rel=1e-10)
    bleu = pick(paper_tests, "math", "H5_fidelity", "fkl", "gsm8k")  # BLEU 30, 10, 20
    assert bleu["statistic"] == pytest.approx(-0.5, rel=1e-12)
    # method all: the pair's KD agreement joins every method's row
    improvement = [1, 2, 3, 2, 4, 6, 3, 3, 6]
    agreement = [50, 70, 60] * 3
    row = pick(paper_tests, "math", "H4_agreement", "all", "gsm8k")
    expected = stats.spearmanr(agreement, improvement)
    assert (row["statistic"], row["pvalue"], row["n"]) == (
        pytest.approx(expected.statistic, rel=1e-12), pytest.approx(expected.pvalue, rel=1e-10), 9)


def test_paper_mode_best_temperature_per_column(paper_tests, tmp_path):
    results = st.load_paper_results(write_paper_fixture(tmp_path))
    imp = st.improvement_table(results)
    fkl = imp[(imp["domain"] == "math") & (imp["student"] == "Qwen-0.5B") & (imp["method"] == "fkl")]
    by_task = fkl.set_index("task")
    assert by_task.loc["gsm8k", ["temperature", "improvement"]].tolist() == [1.0, 1.0]
    assert by_task.loc["svamp", ["temperature", "improvement"]].tolist() == [2.0, 3.0]
    assert by_task.loc["average", ["temperature", "improvement"]].tolist() == [2.0, 2.0]
    assert set(imp["teacher"]) == {"Qwen-7B", "Llama-8B"}  # '_ckpt50' stripped, ':base' runs excluded
    svamp = pick(paper_tests, "math", "H1_improvement_ttest", "fkl", "svamp")  # 3, 1, 2
    assert svamp["statistic"] == pytest.approx(2 * SQRT3, rel=1e-12)


def test_paper_mode_average_only_where_files_have_it(paper_tests):
    # commonsense `average` exists only in cs_results_main.csv: 2 pairs x 3 methods
    assert pick(paper_tests, "commonsense", "H1_improvement_ttest", "all", "average")["n"] == 6
    assert pick(paper_tests, "commonsense", "H1_improvement_ttest", "all", "boolq")["n"] == 9
    per_method = pick(paper_tests, "commonsense", "H1_improvement_ttest", "fkl", "average")
    assert per_method["n"] == 2 and math.isnan(per_method["statistic"])  # fewer than 3 points
    constant = pick(paper_tests, "commonsense", "H1_improvement_ttest", "rkl", "boolq")  # 2, 2, 2
    assert constant["n"] == 3 and math.isnan(constant["statistic"]) and math.isnan(constant["pvalue"])
    anova = pick(paper_tests, "commonsense", "H1_method_anova", "all", "piqa")  # (2,1,3) (1,2,3) (3,2,1)
    assert anova["statistic"] == pytest.approx(0.0, abs=1e-12)
    assert anova["pvalue"] == pytest.approx(1.0, rel=1e-10)


def test_paper_mode_missing_files_named(tmp_path):
    write_paper_fixture(tmp_path, skip=("BLEU.csv", "llama_cs_results.csv"))
    with pytest.raises(FileNotFoundError, match="llama_cs_results.csv, BLEU.csv"):
        st.paper_hypothesis_tests(tmp_path)


def test_paper_mode_non_numeric_accuracy_named(tmp_path):
    write_paper_fixture(tmp_path)
    path = tmp_path / "math_results_main.csv"
    path.write_text(path.read_text().replace("-,Qwen-1.5B,SFT,40,", "-,Qwen-1.5B,SFT,forty,"))
    with pytest.raises(ValueError, match=r"math_results_main.csv: column 'gsm8k' has non-numeric value "
                                         r"'forty' in row 3 \(file line 4\)"):
        st.load_paper_results(tmp_path)


def test_paper_mode_unknown_method_named(tmp_path):
    write_paper_fixture(tmp_path)
    path = tmp_path / "llama_math_results.csv"
    path.write_text(path.read_text().replace("-,Llama-8B,SFT", "-,Llama-8B,LoRA"))
    with pytest.raises(ValueError, match=r"llama_math_results.csv: unknown Method 'LoRA' in row 2"):
        st.load_paper_results(tmp_path)


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason=f"paper results not found at {PAPER_DIR}")
def test_paper_mode_real_data_shape():
    tests = st.paper_hypothesis_tests(PAPER_DIR)
    assert len(tests) == 352
    h1 = tests[(tests["hypothesis"] == "H1_improvement_ttest") & (tests["task"] == "average")]
    # 9 Qwen + 2 Llama teacher-student pairs, 3 methods each
    assert h1.set_index(["domain", "method"])["n"].to_dict() == {
        (d, m): 33 if m == "all" else 11 for d in ("math", "commonsense") for m in ("all", "fkl", "rkl", "gkd")}
    assert tests["statistic"].notna().all() and tests["pvalue"].between(0, 1).all()
    assert set(tests.loc[tests["domain"] == "commonsense", "task"]) == {
        "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "average"}


# ----------------------------------------------------------------------------- study mode

RESULTS_DEFAULTS = dict(study="t", teacher="", temperature="", noise_sigma=0.0, seed=0, domain="math", n=100,
                        correct="", ci_low="", ci_high="")


def results_table(rows: list[tuple]) -> pd.DataFrame:
    """Rows (run_id, role, model, method, task, accuracy, extra dict) -> a validated results table."""
    records = [RESULTS_DEFAULTS | dict(run_id=r, role=role, model=m, method=meth, task=t, accuracy=a) | extra
               for r, role, m, meth, t, a, extra in rows]
    return st.validate_results(pd.DataFrame(records)[list(st.RESULTS_COLUMNS)], "test results")


def small_study() -> pd.DataFrame:
    kd = dict(teacher="T-3B")
    rows = []
    for task, sft0, sft1, t1s0, t1s1, t2s0 in (("gsm8k", 50, 52, 55, 57, 60), ("svamp", 60, 62, 70, 64, 61)):
        rows += [
            ("T", "teacher", "T-3B", "sft", task, {"gsm8k": 80, "svamp": 90}[task], {}),
            ("sft0", "student", "S-1B", "sft", task, sft0, {}),
            ("sft1", "student", "S-1B", "sft", task, sft1, dict(seed=1)),
            ("fkl-t1-s0", "student", "S-1B", "fkl", task, t1s0, kd | dict(temperature=1.0)),
            ("fkl-t1-s1", "student", "S-1B", "fkl", task, t1s1, kd | dict(temperature=1.0, seed=1)),
            ("fkl-t2-s0", "student", "S-1B", "fkl", task, t2s0, kd | dict(temperature=2.0)),
            ("fkl-noise", "student", "S-1B", "fkl", task, 99, kd | dict(temperature=1.0, noise_sigma=1.0)),
            ("fkl-base", "student", "S-1B", "fkl", task, 98, dict(teacher="T-3B:base", temperature=1.0)),
        ]
    rows.append(("rkl-s2", "student", "S-1B", "rkl", "gsm8k", 60, kd | dict(temperature=1.0, seed=2)))
    return results_table(rows)


def test_study_best_temperature_seed_mean_and_baseline():
    imp = st.improvement_table(small_study()).set_index(["method", "task"])
    # gsm8k: t1 seed mean 56 < t2 60 -> t2, improvement 60 - 50 (same-seed SFT)
    assert imp.loc[("fkl", "gsm8k"), ["temperature", "accuracy", "improvement", "n_seeds"]].tolist() == [2.0, 60, 10, 1]
    assert set(imp["n_temperatures"]) == {1}  # one temperature chosen per row
    # svamp: t1 mean 67 > t2 61 -> t1, improvement mean of (70 - 60, 64 - 62) = 6
    assert imp.loc[("fkl", "svamp"), ["temperature", "accuracy", "improvement", "n_seeds"]].tolist() == [1.0, 67, 6, 2]
    # average per run: t1 runs 62.5 / 60.5 vs SFT 55 / 57 -> 5.5
    assert imp.loc[("fkl", "average"), ["temperature", "improvement"]].tolist() == [1.0, 5.5]
    assert imp.loc[("fkl", "gsm8k"), "teacher_accuracy"] == 80
    assert imp.loc[("fkl", "average"), "teacher_accuracy"] == 85
    assert imp.loc[("fkl", "gsm8k"), "student_size"] == 1.0  # parsed from 'S-1B'
    # rkl seed 2 has no SFT seed 2: baseline is the mean over SFT seeds (51)
    assert imp.loc[("rkl", "gsm8k"), ["sft_accuracy", "improvement"]].tolist() == [51, 9]
    sized = st.improvement_table(small_study(), model_sizes={"S-1B": 1.24})
    assert set(sized["student_size"]) == {1.24}


def test_study_mean_and_fixed_temperature_rules():
    mean = st.improvement_table(small_study(), temperature="mean").set_index(["method", "task"])
    # gsm8k: temperature means 56 (t1, two seeds) and 60 (t2): 58 with equal weight, minus SFT 50/52 per seed
    row = mean.loc[("fkl", "gsm8k")]
    assert math.isnan(row["temperature"]) and row["n_temperatures"] == 2 and row["accuracy"] == 58
    assert row["improvement"] == pytest.approx(((55 - 50 + 57 - 52) / 2 + (60 - 50)) / 2)
    fixed = st.improvement_table(small_study(), temperature=2.0).set_index(["method", "task"])
    assert fixed.loc[("fkl", "svamp"), ["temperature", "improvement"]].tolist() == [2.0, 1.0]
    assert set(fixed["n_temperatures"]) == {1}
    assert ("rkl", "gsm8k") not in fixed.index  # rkl ran at temperature 1 only
    with pytest.raises(ValueError, match="temperature must be 'best', 'mean' or a number, got 'max'"):
        st.improvement_table(small_study(), temperature="max")


def test_study_pairs_fallback_run_and_expertise():
    pairs = st.kd_pairs(small_study())
    rkl = pairs[pairs["method"] == "rkl"].iloc[0]
    assert rkl["sft_run_id"] == "sft0"
    base = pairs[pairs["run_id"] == "fkl-base"]
    assert set(base["expertise"]) == {st.TASK_UNAWARE} and set(base["teacher"]) == {"T-3B"}


def test_published_building_blocks_at_their_edges():
    # a spread of exactly 1 is tested; only zero spread is not
    y = [1.0, 2.0, 2.0]
    ref = stats.ttest_1samp(y, 0.0, alternative="greater")
    assert st.improvement_ttest(y) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), "")
    t, p, note = st.improvement_ttest([2.0, 2.0, 2.0])
    assert math.isnan(t) and math.isnan(p) and note == "not testable: constant improvement (zero variance)"
    for groups in ([[1.0, 2.0], [2.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 3.0], [0.0, 5.0]]):
        ref = stats.f_oneway(*groups)
        assert st.method_anova(groups) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), ""), groups
    for groups, note in (([[1.0, 2.0, 3.0]], "not testable: 1 method(s), 3 point(s)"),
                         ([[1.0], [2.0], [3.0]], "not testable: 3 method(s), 3 point(s)"),
                         ([[1.0, 1.0], [2.0, 2.0]], "not testable: no variance within methods")):
        assert st.method_anova(groups)[2] == note
    for x, y in (([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]), ([1.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
                 ([1.0, 2.0, 3.0], [1.0, 2.0, 2.0])):
        ref = stats.spearmanr(x, y)
        assert st.spearman(x, y) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), "")
        # the permutation p-value, exact over the 6 orders of y
        rhos = [stats.spearmanr(x, order).statistic for order in itertools.permutations(y)]
        exact = np.mean(np.abs(rhos) >= abs(ref.statistic) - 1e-12)
        assert st.spearman_permutation_pvalue(x, y) == pytest.approx(exact)
    for x, y in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])):
        rho, p, note = st.spearman(x, y)
        assert math.isnan(rho) and math.isnan(p) and note == "not testable: constant input, Spearman rho undefined"
    # None reads as a missing value: the paper's scipy tests propagate it, the permutation p leaves it out
    for result in (st.improvement_ttest([1.0, None, 3.0]), st.method_anova([[1.0, None], [2.0, 3.0]]),
                   st.spearman([1.0, None, 3.0], [1.0, 2.0, 3.0]), st.spearman([1.0, 2.0, 3.0], [1.0, None, 3.0])):
        assert math.isnan(result[0]) and math.isnan(result[1]) and result[2] == ""
    for x, y in (([1.0, None, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]), ([1.0, 3.0, 2.0, 4.0], [1.0, None, 3.0, 4.0])):
        assert st.spearman_permutation_pvalue(x, y) == pytest.approx(2 / 6)  # 3 points, rho 1: 2 of 6 orders
    # n_resamples reaches the permutation: 499 resamples of 720 orders give a Monte Carlo (hits + 1) / 500
    x, y = [0.5, 1.5, 3.0, 7.0, 1.0, 3.5], [5.0, 4.0, 3.5, -1.0, 6.0, 2.0]
    rho = stats.spearmanr(x, y).statistic
    exact = np.mean(np.abs([stats.spearmanr(x, order).statistic for order in itertools.permutations(y)])
                    >= abs(rho) - 1e-12)
    assert exact == pytest.approx(12 / 720)  # 8.3 / 500: not a Monte Carlo value
    monte_carlo = st.spearman_permutation_pvalue(x, y, n_resamples=499)
    assert monte_carlo * 500 == pytest.approx(round(monte_carlo * 500))
    assert monte_carlo == pytest.approx(exact, abs=0.02)


def test_published_procedure_power_and_notes():
    from statsmodels.stats.power import FTestAnovaPower, TTestPower

    rng = np.random.default_rng(3)
    rows = [dict(domain="math", method=method, task="gsm8k", improvement=rng.normal(1, 2),
                 teacher_accuracy=rng.normal(60, 5), student_size=1.0 + i, sft_accuracy=rng.normal(40, 5),
                 agreement=rng.normal(50, 5), bleu=rng.normal(20, 3)) for method in ("fkl", "rkl") for i in range(20)]
    rows[0]["teacher_accuracy"] = math.nan  # left out of H2 only
    other = dict(teacher_accuracy=60.0, student_size=1.0, sft_accuracy=40.0, agreement=50.0, bleu=20.0)
    rows += [dict(domain="math", method="fkl", task="svamp", improvement=2.0) | other for _ in range(3)]
    rows += [dict(domain="math", method="rkl", task="svamp", improvement=v) | other for v in (1.0, 3.0)]
    # average rows carry no agreement (H4 and H5 leave the average out); a task outside the study's list
    # sorts after average and is still tested
    rows += [dict(domain="math", method="fkl", task="average", improvement=v, teacher_accuracy=60.0 + v,
                  student_size=1.0, sft_accuracy=40.0, agreement=math.nan, bleu=math.nan) for v in (1.0, 2.0, 4.0)]
    rows += [dict(domain="math", method="fkl", task="extra", improvement=v) | other | dict(agreement=50.0 + v)
             for v in (1.0, 2.0, 4.0)]
    rows += [dict(domain="commonsense", method="fkl", task="boolq", improvement=v) | other for v in (1.0, 2.0, 4.0)]
    imp = pd.DataFrame(rows).assign(teacher="T", student="S")
    tests = st.hypothesis_tests(imp)
    assert tests["domain"].tolist() == sorted(tests["domain"], key=["math", "commonsense"].index)  # math first
    by = tests.set_index(["domain", "hypothesis", "method", "task"])
    gsm8k = imp[imp["task"] == "gsm8k"]

    def ttest_row(method: str) -> pd.Series:
        return by.loc[("math", "H1_improvement_ttest", method, "gsm8k")]

    for method, part in (("all", gsm8k), ("fkl", gsm8k[gsm8k["method"] == "fkl"]),
                         ("rkl", gsm8k[gsm8k["method"] == "rkl"])):
        ref = stats.ttest_1samp(part["improvement"], 0.0, alternative="greater")
        power = TTestPower().power(0.5, nobs=len(part), alpha=0.05, alternative="larger")
        row = ttest_row(method)
        assert (row["statistic"], row["pvalue"], row["n"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue),
                                                               len(part))
        assert row["power"] == pytest.approx(power)
        assert row["note"] == ("" if power >= 0.8 else  # 40 points are enough, 20 are not
                               f"underpowered: 20 points, power {power:.2f} for a medium effect (ttest 0.5)")
    assert ttest_row("all")["note"] == "" and ttest_row("fkl")["note"].startswith("underpowered")
    anova = by.loc[("math", "H1_method_anova", "all", "gsm8k")]
    ref = stats.f_oneway(*[g["improvement"] for _, g in gsm8k.groupby("method")])
    power = FTestAnovaPower().power(0.25, nobs=40, alpha=0.05, k_groups=2)  # two methods
    assert (anova["statistic"], anova["pvalue"], anova["power"]) == (
        pytest.approx(ref.statistic), pytest.approx(ref.pvalue), pytest.approx(power))
    assert anova["note"] == f"underpowered: 40 points, power {power:.2f} for a medium effect (anova 0.25)"
    h2 = by.loc[("math", "H2_teacher_performance", "all", "gsm8k")]
    known = gsm8k.dropna(subset=["teacher_accuracy"])
    ref = stats.spearmanr(known["teacher_accuracy"], known["improvement"])
    z = math.atanh(0.3) * math.sqrt(39 - 3)  # Fisher z power for rho 0.3, two-sided
    power = stats.norm.sf(stats.norm.ppf(0.975) - z) + stats.norm.cdf(-stats.norm.ppf(0.975) - z)
    assert (h2["statistic"], h2["pvalue"], h2["n"], h2["power"]) == (
        pytest.approx(ref.statistic), pytest.approx(ref.pvalue), 39, pytest.approx(power))
    assert h2["note"] == f"underpowered: 39 points, power {power:.2f} for a medium effect (spearman 0.3)"
    assert by.loc[("math", "H1_improvement_ttest", "fkl", "svamp"), "note"] == (
        "not testable: constant improvement (zero variance)")
    assert by.loc[("math", "H1_improvement_ttest", "rkl", "svamp"), "note"] == "not testable: 2 point(s) < 3"
    assert by.loc[("math", "H1_improvement_ttest", "all", "average"), "n"] == 3
    assert by.loc[("math", "H1_improvement_ttest", "fkl", "average"), "statistic"] == pytest.approx(
        stats.ttest_1samp([1.0, 2.0, 4.0], 0.0).statistic)  # 3 points are enough
    assert by.loc[("math", "H4_agreement", "all", "extra"), "statistic"] == pytest.approx(1.0)
    assert ("math", "H4_agreement", "all", "average") not in by.index
    # without one x column the other hypotheses are still tested
    without = st.hypothesis_tests(imp.drop(columns="teacher_accuracy"))
    assert set(without["hypothesis"]) == {h for h, *_ in st.HYPOTHESES} - {"H2_teacher_performance"}
    assert list(st.hypothesis_tests(imp.iloc[:0]).columns) == list(st.TEST_COLUMNS) + ["note", "power"]


def test_study_not_testable_below_three_points():
    tests = st.hypothesis_tests(st.improvement_table(small_study()))
    row = pick(tests, "math", "H1_improvement_ttest", "fkl", "gsm8k")
    assert row["n"] == 1 and math.isnan(row["statistic"]) and math.isnan(row["pvalue"])
    assert row["note"] == "not testable: 1 point(s) < 3"
    assert pick(tests, "math", "H1_method_anova", "all", "gsm8k")["note"].startswith("not testable")
    assert "H4_agreement" not in set(tests["hypothesis"])  # no fidelity data given


def test_study_ablation_tables():
    results = small_study()
    temperature = st.ablation_table(results, "temperature")
    assert sorted(temperature.loc[temperature["task"] == "gsm8k", "temperature"]) == [1.0, 2.0]
    noise = st.ablation_table(results, "noise_sigma")
    assert noise.loc[noise["task"] == "gsm8k", ["noise_sigma", "accuracy"]].values.tolist() == [[0.0, 56], [1.0, 99]]
    expertise = st.ablation_table(results, "expertise")
    assert expertise.loc[expertise["task"] == "gsm8k", ["expertise", "accuracy"]].values.tolist() == [
        [st.EXPERT, 56], [st.TASK_UNAWARE, 98]]
    with pytest.raises(ValueError,
                       match="^unknown ablation factor 'lr'; expected one of temperature, noise_sigma, expertise$"):
        st.ablation_table(results, "lr")


def test_seed_spread_over_configurations_with_two_seeds():
    spread = st.seed_spread(small_study())
    # only SFT and fkl at temperature 1 (noise 0, expert teacher) have two seeds; the rest have one
    assert spread.loc[spread["method"] == "sft", "temperature"].isna().all()  # SFT has no temperature
    assert set(zip(spread["method"], spread["temperature"].fillna(0), strict=True)) == {("sft", 0), ("fkl", 1.0)}
    spread = spread.set_index(["method", "temperature", "task"]).sort_index()
    sft = spread.xs("sft", level="method").reset_index("temperature", drop=True)
    assert sft.loc["gsm8k", ["n_seeds", "accuracy", "accuracy_min", "accuracy_max"]].tolist() == [2, 51, 50, 52]
    assert sft.loc["gsm8k", "accuracy_sd"] == pytest.approx(math.sqrt(2))
    assert sft["improvement"].isna().all()  # SFT has no improvement over itself
    fkl = spread.loc[("fkl", 1.0)]
    # svamp: 70 - 60 and 64 - 62 (same-seed SFT), so improvements 10 and 2
    assert fkl.loc["svamp", ["improvement", "improvement_min", "improvement_max"]].tolist() == [6, 2, 10]
    assert fkl.loc["svamp", "improvement_sd"] == pytest.approx(math.sqrt(32))
    assert fkl.loc["gsm8k", "improvement_sd"] == 0  # 55 - 50 and 57 - 52
    assert fkl.loc["average", "accuracy"] == pytest.approx((62.5 + 60.5) / 2)
    assert st.seed_spread(small_study().query("seed == 0")).empty


def test_task_average_rows_follow_run_order_with_nan_counts():
    # run z comes before run a: the averages keep the table's order; run 'part' lacks svamp, so it gets none
    table = results_table([
        ("z", "student", "S-1B", "sft", "gsm8k", 50, dict(correct=50, ci_low=40, ci_high=60)),
        ("z", "student", "S-1B", "sft", "svamp", 70, dict(correct=70, ci_low=60, ci_high=80)),
        ("a", "student", "S-1B", "sft", "gsm8k", 40, dict(seed=1, correct=40, ci_low=30, ci_high=50)),
        ("a", "student", "S-1B", "sft", "svamp", 60, dict(seed=1, correct=60, ci_low=50, ci_high=70)),
        ("part", "student", "S-1B", "sft", "gsm8k", 30, dict(seed=2, correct=30, ci_low=20, ci_high=40)),
    ])
    out = st.with_task_average(table)
    assert out.index.equals(pd.RangeIndex(len(table) + 2))  # a fresh index: row labels stay unique
    pd.testing.assert_frame_equal(out.iloc[:len(table)], table)
    average = out.iloc[len(table):]
    assert average["run_id"].tolist() == ["z", "a"] and set(average["task"]) == {"average"}
    assert average["accuracy"].tolist() == [60, 50]
    # an average has no count or interval of its own: NaN floats, as a blank cell of results.csv reads
    for col in ("n", "correct", "ci_low", "ci_high"):
        assert out[col].dtype == np.float64 and average[col].isna().all()


def test_two_sft_runs_of_one_seed_named():
    extra = results_table([("sft0-again", "student", "S-1B", "sft", "gsm8k", 51, {})])
    with pytest.raises(ValueError, match=r"^more than one SFT run for model 'S-1B', task 'gsm8k', seed 0\.0$"):
        st.kd_pairs(pd.concat([small_study(), extra], ignore_index=True))


def test_kd_run_without_any_sft_run_keeps_a_nan_improvement():
    extra = results_table([("u-fkl", "student", "U-2B", "fkl", "gsm8k", 40, dict(teacher="T-3B", temperature=1.0))])
    pairs = st.kd_pairs(pd.concat([small_study(), extra], ignore_index=True))
    row = pairs[pairs["run_id"] == "u-fkl"]
    assert row["accuracy"].tolist() == [40]
    assert row[["sft_run_id", "sft_accuracy", "improvement"]].isna().all(axis=None)


def test_kd_runs_without_a_temperature_are_kept():
    # seqkd with a blank temperature (the schema allows it) next to fkl at temperature 1; SFT 50 / 60
    kd = dict(teacher="T-3B")
    rows = []
    for task, sft, fkl, seqkd, noisy in (("gsm8k", 50, 55, 58, 52), ("svamp", 60, 66, 61, 59)):
        rows += [("sft0", "student", "S-1B", "sft", task, sft, {}),
                 ("fkl", "student", "S-1B", "fkl", task, fkl, kd | dict(temperature=1.0)),
                 ("seqkd", "student", "S-1B", "seqkd", task, seqkd, kd),
                 ("seqkd-noise", "student", "S-1B", "seqkd", task, noisy, kd | dict(noise_sigma=1.0))]
    results = results_table(rows)
    imp = st.improvement_table(results)
    by = imp.set_index(["method", "task"])
    assert math.isnan(by.loc[("seqkd", "gsm8k"), "temperature"])
    assert by.loc[("seqkd", "gsm8k"), ["accuracy", "improvement"]].tolist() == [58, 8]
    assert by.loc[("seqkd", "average"), ["accuracy", "improvement"]].tolist() == [59.5, 4.5]
    noise = st.ablation_table(results, "noise_sigma")
    assert set(noise["method"]) == {"seqkd"}  # fkl ran without noise only
    assert noise.loc[noise["task"] == "gsm8k", ["noise_sigma", "accuracy"]].values.tolist() == [[0.0, 58], [1.0, 52]]

    fidelity = pd.DataFrame(
        [("fkl", 1.0, 0.0, "gsm8k", 0.6), ("fkl", 1.0, math.nan, "gsm8k", 0.8),  # a blank sigma is no noise
         ("fkl", 1.0, 1.0, "gsm8k", 0.1),  # a noisy teacher's run never matches
         ("fkl", 1.0, 0.0, "svamp", 0.5),
         ("seqkd", math.nan, 0.0, "gsm8k", 0.4), ("seqkd", math.nan, 0.0, "svamp", 0.2),
         # SFT rows (even one for 'average') neither match nor stop the KD averages being computed
         ("sft", math.nan, 0.0, "gsm8k", 0.9), ("sft", math.nan, 0.0, "average", 0.9)],
        columns=["method", "temperature", "noise_sigma", "task", "agreement"],
    ).assign(domain="math", teacher="T-3B", student="S-1B")
    joined = st.attach_fidelity(imp, fidelity)
    assert len(joined) == len(imp) == 6
    assert joined.set_index(["method", "task"])["agreement"].to_dict() == pytest.approx({
        ("fkl", "gsm8k"): 0.7, ("fkl", "svamp"): 0.5, ("fkl", "average"): 0.6,
        ("seqkd", "gsm8k"): 0.4, ("seqkd", "svamp"): 0.2, ("seqkd", "average"): 0.3})


def test_fidelity_given_average_is_used_and_rows_without_fidelity_stay():
    imp = st.improvement_table(small_study())
    # the paper's shape: per (teacher, student, task), with an 'average' of its own; nothing for svamp
    fidelity = pd.DataFrame({"domain": "math", "teacher": "T-3B", "student": "S-1B",
                             "task": ["gsm8k", "average"], "agreement": [0.4, 0.9]})
    joined = st.attach_fidelity(imp, fidelity)
    keys = ["domain", "teacher", "student", "method", "task"]
    assert joined[keys].equals(imp[keys])  # every improvement row once, in order
    agreement = joined.set_index(["method", "task"])["agreement"]
    assert agreement[("fkl", "gsm8k")] == agreement[("rkl", "gsm8k")] == 0.4  # every method's row
    assert agreement[("fkl", "average")] == 0.9  # as given, not the mean of the rows given
    assert math.isnan(agreement[("fkl", "svamp")])
    # a fidelity key the improvements lack is an error, not a looser join copying values across domains
    with pytest.raises(KeyError, match="domain"):
        st.attach_fidelity(imp.drop(columns="domain"), fidelity)


def test_study_missing_column_named(tmp_path):
    path = tmp_path / "results.csv"
    small_study().drop(columns=["accuracy", "seed"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"results.csv is missing required column\(s\): seed, accuracy"):
        st.load_results(path)


def test_study_non_numeric_accuracy_named(tmp_path):
    path = tmp_path / "results.csv"
    table = small_study().astype({"accuracy": object})
    table.loc[4, "accuracy"] = "n/a"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'accuracy' has non-numeric value 'n/a' in row 5 \(file line 6\)"):
        st.load_results(path)


def test_study_bad_role_and_duplicates_named():
    table = small_study()
    with pytest.raises(ValueError, match=r"column 'method' has unknown value 'kd' in row 3"):
        st.validate_results(table.assign(method=table["method"].where(table.index != 2, "kd")), "t")
    with pytest.raises(ValueError, match=r"duplicate \(run_id, task\) = \('T', 'gsm8k'\) in row 2"):
        st.validate_results(pd.concat([table.iloc[:1], table]).reset_index(drop=True), "t")


def test_model_sizes(tmp_path):
    assert st.parse_model_size("Qwen2.5-0.5B") == 0.5
    assert st.parse_model_size("Llama-3.2-1B") == 1.0
    assert st.parse_model_size("smollm2-135m-instruct") == pytest.approx(0.135)
    assert st.parse_model_size("Qwen2.5-1.5B-Instruct") == 1.5
    assert math.isnan(st.parse_model_size("gpt2"))
    (tmp_path / "models.csv").write_text("model,n_params\nsmollm2-135m,134515008\n")
    assert st.load_model_sizes(tmp_path / "models.csv") == {"smollm2-135m": pytest.approx(0.134515008)}


def test_holm_known_values():
    tests = pd.DataFrame({"family": ["a"] * 4 + ["b"], "pvalue": [0.01, 0.04, 0.03, math.nan, 0.02]})
    out = st.holm_adjust(tests, family=["family"])
    # sorted 0.01*3, 0.03*2, 0.04*1 -> 0.03, 0.06, max(0.06, 0.04); NaN not counted; b alone
    assert out["pvalue_holm"].tolist()[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(out["pvalue_holm"].iloc[3]) and out["pvalue_holm"].iloc[4] == pytest.approx(0.02)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(3).random(12) ** 3
    p[4] = p[7]  # a tie
    assert st.holm(p) == pytest.approx(multipletests(p, method="holm")[1], rel=1e-15)


def test_spearman_permutation_pvalue_exact():
    assert st.spearman_permutation_pvalue([1, 2, 3], [1, 2, 3]) == pytest.approx(1 / 3)  # 2 of 6 pairings
    assert st.spearman_permutation_pvalue([1, 2, 3], [1, 3, 2]) == pytest.approx(1.0)
    assert math.isnan(st.spearman_permutation_pvalue([1, 1, 1], [1, 2, 3]))


def planted_mixed_rows(n_students: int = 6, seed: int = 1) -> pd.DataFrame:
    """2 teachers x n_students pairs x 2 methods x 6 tasks with planted size, method and task effects."""
    rng = np.random.default_rng(seed)
    sizes = [0.5, 1.0, 1.5, 3.0, 7.0, 14.0][:n_students]
    rows = []
    task_effects = rng.normal(0, 2, 6)
    for size in sizes:
        student_effect = rng.normal(0, 0.3)
        for teacher in ("T-a", "T-b"):
            for t, task_effect in enumerate(task_effects):
                for method, effect in (("fkl", 0.0), ("rkl", 1.5)):
                    rows.append(dict(domain="math", teacher=teacher, student=f"S-{size}B", task=f"task{t}",
                                     student_size=size, method=method,
                                     improvement=2 - 3 * np.log(size) + effect + task_effect + student_effect
                                     + rng.normal(0, 0.5)))
    return pd.DataFrame(rows)


def test_mixed_effects_recovers_planted_effects():
    fit = st.mixed_effects(planted_mixed_rows()).set_index("term")
    assert fit.loc["log(student_size_B)", "coef"] == pytest.approx(-3, abs=0.5)
    assert fit.loc["method[rkl vs fkl]", "coef"] == pytest.approx(1.5, abs=0.3)
    # descriptive: coefficients and standard errors, no Wald p-values or intervals (too few students)
    assert fit.loc["method[rkl vs fkl]", "se"] > 0
    assert fit[["z", "pvalue", "ci_low", "ci_high"]].isna().all().all()
    assert fit["note"].str.startswith("converged").all() and fit["note"].str.contains("descriptive").all()
    assert "variance: student (random intercept)" in fit.index and not any("Intercept" in t for t in fit.index)


def test_mixed_effects_refuses_small_designs():
    four = st.mixed_effects(planted_mixed_rows(4)).set_index("term")
    # size varies between 4 students only: dropped, and said so; the method contrast stays
    assert "log(student_size_B)" not in four.index and "method[rkl vs fkl]" in four.index
    assert "log(size) omitted: 4 student size(s)" in four["note"].iloc[0]
    two = st.mixed_effects(planted_mixed_rows(2))
    assert len(two) == 1 and two["coef"].isna().all()
    assert two["note"].iloc[0] == "not testable: 2 student(s), 4 pair(s); the model needs 3 and 4"


# ----------------------------------------------------------------------------- per-example tests


def test_mcnemar_known_values():
    kd = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    sft = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    res = st.mcnemar_test(kd, sft)
    # exact: 2 * P(Binom(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096
    assert res == {"n": 20, "kd_only": 10, "sft_only": 2, "statistic": 2.0, "pvalue": pytest.approx(158 / 4096)}
    assert st.mcnemar_test([True, False, True], [False, True, True])["pvalue"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paired examples"):
        st.mcnemar_test([True], [True, False])


def test_paired_difference_known_values():
    a = [True, True, False, False, True]
    b = [False, True, False, True, False]
    res = st.paired_difference(a, b)
    # 2 examples only a gets right, 1 only b: d = 1/5; Agresti-Min: 1/2 added to every cell, so
    # b' = 2.5, c' = 1.5, n' = 7, centre 1/7, half-width 1.96 sqrt(4 - 1 / 7) / 7
    half = 1.96 * math.sqrt(4 - 1 / 7) / 7
    assert res == {"difference": pytest.approx(20.0), "ci_low": pytest.approx(100 * (1 / 7 - half)),
                   "ci_high": pytest.approx(100 * (1 / 7 + half)), "n": 5, "a_only": 2, "b_only": 1,
                   "pvalue": pytest.approx(1.0)}  # 2 P(Binom(3, 1/2) <= 1) = 1
    # no discordant example: the plain Wald interval would have zero width; this one does not
    same = st.paired_difference(a, a)
    assert (same["difference"], same["pvalue"]) == (0.0, 1.0)
    assert (same["ci_low"], same["ci_high"]) == (pytest.approx(-100 * 1.96 / 7), pytest.approx(100 * 1.96 / 7))


@pytest.mark.parametrize("accuracy", [0.03, 0.3])
def test_paired_difference_under_the_null(accuracy):
    """Two runs of equal accuracy on 160 examples (the protocol ablation's size, at its floor and above):
    the 95% interval covers 0 about 95% of the time and the exact McNemar test stays at or below its level."""
    rng = np.random.default_rng(0)
    results = [st.paired_difference(rng.random(160) < accuracy, rng.random(160) < accuracy) for _ in range(2000)]
    coverage = np.mean([r["ci_low"] <= 0 <= r["ci_high"] for r in results])
    rejected = np.mean([r["pvalue"] < 0.05 for r in results])
    assert 0.93 <= coverage <= 0.97  # 2000 replicates: the Monte Carlo SE is 0.005
    assert rejected <= 0.05 + 3 * 0.005


def test_mcnemar_pvalues_match_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    b, c = np.array([0, 3, 10, 25, 7]), np.array([0, 9, 2, 30, 7])
    expected = [mcnemar([[5, bi], [ci, 5]], exact=True).pvalue for bi, ci in zip(b, c)]
    assert st.mcnemar_pvalues(b, c) == pytest.approx(expected, rel=1e-12)


def count_results(rows: list[tuple]) -> pd.DataFrame:
    """(run_id, role, model, method, temperature, n, correct) on one task -> a results table with counts."""
    return results_table([(r, role, m, meth, "gsm8k", 100 * c / n,
                           dict(n=n, correct=c, temperature=t, teacher="T-3B" if meth != "sft" else ""))
                          for r, role, m, meth, t, n, c in rows])


def test_bootstrap_intervals_from_counts_known_values():
    # KD all right vs SFT all wrong: every resample gives exactly +100; identical runs give 0
    results = count_results([("sft", "student", "S-1B", "sft", "", 7, 0), ("kd1", "student", "S-1B", "fkl", 1.0, 7, 7),
                             ("kd2", "student", "S-1B", "fkl", 2.0, 7, 7)])
    imp = st.improvement_intervals(results, st.improvement_table(results, temperature="mean"), None, 200)
    assert imp.loc[imp["task"] == "gsm8k", ["ci_low", "ci_high"]].values.tolist() == [[100.0, 100.0]]
    assert set(imp["ci_basis"]) == {"bootstrap of per-run counts (unpaired)"}
    # large counts: the mean over two temperatures minus one SFT run ~ normal with variance
    # var(K1)/4 + var(K2)/4 + var(S): the SFT run is resampled once, not once per temperature
    results = count_results([("sft", "student", "S-1B", "sft", "", 4000, 2000),
                             ("kd1", "student", "S-1B", "fkl", 1.0, 4000, 2400),
                             ("kd2", "student", "S-1B", "fkl", 2.0, 4000, 2800)])
    imp = st.improvement_intervals(results, st.improvement_table(results, temperature="mean"), None, 4000)
    row = imp[imp["task"] == "gsm8k"].iloc[0]
    se = 100 * math.sqrt((0.6 * 0.4 + 0.7 * 0.3) / 4 / 4000 + 0.25 / 4000)
    assert row["improvement"] == pytest.approx(15.0)
    assert row["ci_low"] == pytest.approx(15 - 1.96 * se, abs=0.25) and row["ci_high"] == pytest.approx(
        15 + 1.96 * se, abs=0.25)
    none = st.improvement_intervals(results.assign(n=math.nan), st.improvement_table(results, temperature="mean"))
    assert none["ci_low"].isna().all() and set(none["ci_basis"]) == {"no per-example data"}


def outcome_tables(correct: dict[tuple[str, str], list[bool]]) -> Predictions:
    """In-memory predictions: per (run, task) the correctness of examples e0, e1, ..."""
    return Predictions(tables={key: pd.DataFrame({"id": [f"e{i}" for i in range(len(flags))], "correct": flags})
                                  for key, flags in correct.items()})


def test_mcnemar_tests_by_hand():
    results = results_table([
        (run, "student", "S-1B", method, task, 50.0, extra)
        for run, method, extra in (("sft0", "sft", {}), ("kd1", "fkl", dict(teacher="T-3B", temperature=1.0)),
                                   ("kd2", "fkl", dict(teacher="T-3B", temperature=2.0)))
        for task in ("gsm8k", "svamp")])
    t, f = True, False
    # kd1 has no gsm8k file: that row is skipped and the rows after it are still tested
    predictions = outcome_tables({
        ("sft0", "gsm8k"): [t, f, f, t, f, f], ("kd2", "gsm8k"): [t, t, t, t, t, f],
        ("sft0", "svamp"): [t, t, f, f], ("kd1", "svamp"): [f, t, t, f], ("kd2", "svamp"): [f, f, t, t]})
    out = st.mcnemar_tests(results, predictions)
    # (run, task): n, KD right only, SFT right only
    expected = {("kd1", "svamp"): (4, 1, 1), ("kd2", "gsm8k"): (6, 3, 0), ("kd2", "svamp"): (4, 2, 2)}
    assert {(r, task): (n, a, b) for r, task, n, a, b in out[["run_id", "task", "n", "kd_only", "sft_only"]].values
            } == expected
    pvalues = {key: stats.binomtest(min(a, b), a + b, 0.5).pvalue for key, (_, a, b) in expected.items()}
    got = out.set_index(["run_id", "task"])
    for key, (_, a, b) in expected.items():
        assert got.loc[key, "statistic"] == min(a, b) and got.loc[key, "pvalue"] == pytest.approx(pvalues[key])
    # one Holm family (domain, teacher, student, method): p 0.25, 1, 1 -> 0.75, 1, 1
    assert pvalues[("kd2", "gsm8k")] == pytest.approx(0.25)
    assert got["pvalue_holm"].to_dict() == pytest.approx({("kd1", "svamp"): 1.0, ("kd2", "gsm8k"): 0.75,
                                                          ("kd2", "svamp"): 1.0})
    assert got.loc[("kd2", "gsm8k"), ["sft_run_id", "temperature", "seed"]].tolist() == ["sft0", 2.0, 0.0]
    empty = st.mcnemar_tests(results, outcome_tables({}))
    assert empty.empty and list(empty.columns) == [
        "domain", "teacher", "student", "method", "task", "temperature", "seed", "run_id", "sft_run_id", "n",
        "kd_only", "sft_only", "statistic", "pvalue", "pvalue_holm"]
    # outcomes as 0/1 floats (as the prediction files are read for the bootstrap) count the same
    assert st.mcnemar_test([1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]) == {
        "n": 4, "kd_only": 2, "sft_only": 1, "statistic": 1.0, "pvalue": pytest.approx(1.0)}


def test_split_estimates_by_hand():
    kd = dict(teacher="T-3B")
    results = results_table([
        (f"{student}-{run}", "student", student, method, task, accuracy, extra)
        for student in ("S-1B", "U-2B")
        for run, method, extra, accuracies in (
            ("sft0", "sft", {}, (40.0, 50.0)), ("kd1", "fkl", kd | dict(temperature=1.0), (55.0, 62.0)),
            ("kd2", "fkl", kd | dict(temperature=2.0), (60.0, 64.0)))
        # results with their own average rows (as the paper's files have): not a task of the split
        for task, accuracy in zip(("gsm8k", "svamp", "average"), (*accuracies, sum(accuracies) / 2))])
    # correct of 10 on halves A and B; kd1's svamp split is of counts, all else of examples; U-2B has none
    split = pd.DataFrame([
        ("S-1B-kd1", "gsm8k", 8, 5, "examples"), ("S-1B-kd2", "gsm8k", 8, 4, "examples"),
        ("S-1B-sft0", "gsm8k", 5, 3, "examples"), ("S-1B-kd1", "svamp", 7, 6, "counts"),
        ("S-1B-kd2", "svamp", 7, 9, "examples"), ("S-1B-sft0", "svamp", 4, 5, "examples"),
    ], columns=["run_id", "task", "correct_a", "correct_b", "split"]).assign(n_a=10, n_b=10)
    out = st.split_estimates(results, st.improvement_table(results, temperature="mean"), split)
    got = out[out["student"] == "S-1B"].set_index("task")
    # SFT on A: 50 and 40, average 45
    assert got["sft_accuracy_a"].to_dict() == pytest.approx({"gsm8k": 50.0, "svamp": 40.0, "average": 45.0})
    # KD on B (on all examples where the split is of counts: kd1 svamp 62) minus SFT on B, mean over temperatures:
    # gsm8k (50 - 30 + 40 - 30) / 2, svamp (62 - 50 + 90 - 50) / 2, average over the tasks per temperature
    assert got["improvement_b"].to_dict() == pytest.approx({"gsm8k": 15.0, "svamp": 26.0, "average": 20.5})
    # gsm8k: A ties at 80, the lower temperature wins, its B difference 50 - 30; svamp and average read a
    # counts split, so nothing is selected there
    assert got.loc["gsm8k", ["selected_temperature", "improvement_selected"]].tolist() == [1.0, 20.0]
    assert got.loc[["svamp", "average"], ["selected_temperature", "improvement_selected"]].isna().all(axis=None)
    other = out[out["student"] == "U-2B"]
    assert len(other) == 3 and other[["sft_accuracy_a", "improvement_b"]].isna().all(axis=None)


def test_bootstrap_intervals_weigh_seeds_and_need_a_matching_run():
    # two seeds, KD all right and SFT all wrong in both: every resample gives exactly +100 if each seed's
    # difference weighs 1/2
    kd = dict(teacher="T-3B", temperature=1.0)
    results = results_table([("sft0", "student", "S-1B", "sft", "gsm8k", 0.0, dict(n=7, correct=0)),
                             ("sft1", "student", "S-1B", "sft", "gsm8k", 0.0, dict(n=7, correct=0, seed=1)),
                             ("kd0", "student", "S-1B", "fkl", "gsm8k", 100.0, kd | dict(n=7, correct=7)),
                             ("kd1", "student", "S-1B", "fkl", "gsm8k", 100.0, kd | dict(n=7, correct=7, seed=1))])
    imp = st.improvement_intervals(results, st.improvement_table(results, temperature="mean"), None, 50)
    assert imp[["task", "ci_low", "ci_high"]].values.tolist() == [["gsm8k", 100.0, 100.0], ["average", 100.0, 100.0]]
    # rows at a temperature no run of these results has: no cell, no interval
    moved = results.assign(temperature=results["temperature"].replace(1.0, 2.0))
    none = st.improvement_intervals(moved, st.improvement_table(results, temperature=1.0), None, 50)
    assert none[["ci_low", "ci_high"]].isna().all(axis=None) and set(none["ci_basis"]) == {"no per-example data"}


def test_bootstrap_cells_known_and_unknown():
    kd = dict(teacher="T-3B", temperature=1.0)
    both = ("gsm8k", "svamp")
    results = results_table(
        [("s-sft", "student", "S-1B", "sft", task, 0.0, dict(n=6, correct=0)) for task in both]
        + [("s-kd", "student", "S-1B", "fkl", task, 100.0, kd | dict(n=6, correct=6)) for task in both]
        + [("u-sft", "student", "U-2B", "sft", "gsm8k", 50.0, dict(n=6)),  # no count of correct answers
           ("u-kd", "student", "U-2B", "fkl", "gsm8k", 100.0, kd | dict(n=6, correct=6)),
           ("v-sft", "student", "V-3B", "sft", "gsm8k", 0.0, dict(n=0, correct=0)),  # no examples
           ("v-kd", "student", "V-3B", "fkl", "gsm8k", 100.0, kd | dict(n=6, correct=6)),
           ("w-sft", "student", "W-4B", "sft", "gsm8k", 0.0, dict(n=1, correct=0)),  # one example is enough
           ("w-kd", "student", "W-4B", "fkl", "gsm8k", 100.0, kd | dict(n=1, correct=1))])
    imp = st.improvement_table(results, temperature="mean")
    gsm8k = st.improvement_intervals(results, imp, None, 50).set_index(["student", "task"]).xs("gsm8k", level="task")
    # all right minus all wrong: every resample +100; a cell without a usable count leaves its row unknown
    for student in ("S-1B", "W-4B"):
        assert gsm8k.loc[student, ["ci_low", "ci_high", "ci_basis"]].tolist() == [
            100.0, 100.0, "bootstrap of per-run counts (unpaired)"]
    for student in ("U-2B", "V-3B"):
        assert gsm8k.loc[student, ["ci_low", "ci_high"]].isna().all()
        assert gsm8k.loc[student, "ci_basis"] == "no per-example data"
    # with predictions (gsm8k only) the examples are resampled, n of them each time, shared by both runs;
    # svamp and the average (which reads svamp) fall back to the counts
    t, f = True, False
    predictions = outcome_tables({("s-sft", "gsm8k"): [f] * 6, ("s-kd", "gsm8k"): [t] * 6})
    s_rows = imp[imp["student"] == "S-1B"]
    paired = st.improvement_intervals(results[results["model"] == "S-1B"], s_rows, predictions, 50)
    assert paired[["task", "ci_low", "ci_high", "ci_basis"]].values.tolist() == [
        ["gsm8k", 100.0, 100.0, "paired bootstrap over examples"],
        ["svamp", 100.0, 100.0, "bootstrap of per-run counts (unpaired)"],
        ["average", 100.0, 100.0, "bootstrap of per-run counts (unpaired)"]]
    # a row no run belongs to gets no interval, whatever the other rows get
    lone = pd.concat([s_rows, s_rows.head(1).assign(student="Z-9B")], ignore_index=True)
    with_lone = st.improvement_intervals(results, lone, None, 50)
    assert with_lone["ci_low"].tolist()[:3] == [100.0, 100.0, 100.0] and math.isnan(with_lone["ci_low"].iloc[3])
    assert with_lone["ci_low"].dtype == np.float64 and with_lone["ci_basis"].iloc[3] == "no per-example data"


def test_bootstrap_interval_level():
    # SFT all wrong, KD 5 of 10: a replicate is 100 * Binom(10, 1/2) / 10, whose quartiles are 4 and 6 of 10
    # (P(X <= 3) = 0.17, P(X <= 4) = 0.38, P(X <= 5) = 0.62, P(X <= 6) = 0.83)
    results = results_table([("sft", "student", "S-1B", "sft", "gsm8k", 0.0, dict(n=10, correct=0)),
                             ("kd", "student", "S-1B", "fkl", "gsm8k", 50.0,
                              dict(n=10, correct=5, teacher="T-3B", temperature=1.0))])
    imp = st.improvement_intervals(results, st.improvement_table(results, temperature="mean"), None, 2000, level=0.5)
    assert imp[["ci_low", "ci_high"]].values.tolist() == [[40.0, 60.0], [40.0, 60.0]]
    # seeded: the same call gives the same interval (a report must not change on re-running)
    twice = [st.improvement_intervals(results, st.improvement_table(results, temperature="mean"), None, 20)
             for _ in range(2)]
    pd.testing.assert_frame_equal(*twice)


def test_study_intervals_and_mcnemar_from_predictions(tmp_path):
    path = write_study(tmp_path)
    results = st.load_results(path)
    imp = st.improvement_table(results, temperature="mean")
    runs = tmp_path / "runs"
    with_ci = st.improvement_intervals(results, imp, runs, n_resamples=500)
    assert (with_ci["ci_basis"] == "paired bootstrap over examples").all()
    assert ((with_ci["ci_low"] <= with_ci["improvement"]) & (with_ci["improvement"] <= with_ci["ci_high"])).all()
    from_counts = st.improvement_intervals(results, imp, None, n_resamples=500)
    assert (from_counts["ci_basis"] == "bootstrap of per-run counts (unpaired)").all()
    mcnemar = st.mcnemar_tests(results, runs)
    pairs = st.main_pairs(results)
    assert len(mcnemar) == (pairs["task"] != "average").sum()  # every temperature, nothing selected
    # discordant counts reproduce each run's accuracy difference on the 30 examples
    merged = mcnemar.merge(pairs[["run_id", "task", "improvement"]], on=["run_id", "task"])
    assert np.allclose(100 * (merged["kd_only"] - merged["sft_only"]) / merged["n"], merged["improvement"])
    assert (mcnemar["pvalue_holm"] >= mcnemar["pvalue"]).all()
    # Holm families: the tasks x temperatures of each (domain, pair, method): math 2 x 2, commonsense 1 x 2
    sizes = mcnemar.groupby(["domain", "teacher", "student", "method"]).size()
    assert set(sizes.loc["math"]) == {4} and set(sizes.loc["commonsense"]) == {2}


# ----------------------------------------------------------------------------- simulation


def test_h1_ttest_size_and_power_by_simulation():
    """2,000 simulated studies of 9 improvements: ~5% rejections at alpha 0.05 under no effect;
    a planted effect of one standard deviation is detected (power ~0.9 for n = 9)."""
    rng = np.random.default_rng(2025)
    null = rng.normal(0.0, 3.0, size=(2000, 9))
    planted = rng.normal(3.0, 3.0, size=(2000, 9))
    null_rate = np.mean([st.improvement_ttest(y)[1] < 0.05 for y in null])
    power = np.mean([st.improvement_ttest(y)[1] < 0.05 for y in planted])
    assert 0.03 <= null_rate <= 0.07
    assert power > 0.8


def test_medium_effect_power_against_known_values():
    """The smallest n with power >= 0.8 matches the textbook sample sizes (Cohen 1988; G*Power)."""
    def smallest_n(kind, **kw):
        return next(n for n in range(4, 400) if st.medium_effect_power(kind, n, **kw) >= 0.8)

    assert smallest_n("ttest") == 27  # one-sided one-sample, d = 0.5
    assert smallest_n("spearman") == 85  # two-sided, rho = 0.3
    assert smallest_n("anova", k_groups=3) in (158, 159)  # f = 0.25, 3 groups (53 per group)
    assert st.medium_effect_power("spearman", 3) != st.medium_effect_power("spearman", 3)  # NaN: undefined


def test_small_tests_are_marked_underpowered():
    improvements = pd.DataFrame({"domain": "math", "teacher": "t", "student": [f"s{i}" for i in range(6)],
                                 "method": ["fkl", "rkl", "gkd"] * 2, "task": "gsm8k",
                                 "improvement": [1.0, 2.0, -1.0, 3.0, 0.5, 2.5]})
    tests = st.hypothesis_tests(improvements)
    h1 = tests[(tests["hypothesis"] == "H1_improvement_ttest") & (tests["method"] == "all")].iloc[0]
    assert h1["n"] == 6 and h1["power"] < 0.8 and h1["note"].startswith("underpowered: 6 points, power 0.")
