"""Whole-pipeline simulations inside `make test`: the study-mode tests hold their level under the
realistic nulls, and the procedures they replaced do not.

A smaller design than the benchmark's (2 tasks per domain, few studies) keeps this short; the
tolerances are set from the number of tests each family gets here (benchmarks/null_simulation.py
measures every scenario with many more studies).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kd_utils import pipeline_simulation as pipeline
from kd_utils import statistics as st
from kd_utils.analysis import study_analysis
from kd_utils.statistics import simulation as sim

TASKS = (("gsm8k", "math"), ("aqua", "math"), ("boolq", "commonsense"), ("arc_e", "commonsense"))
ALPHA = 0.05


def upper(row: pd.Series) -> float:
    """alpha plus 3 standard errors: the larger of the cluster SE and the binomial SE of this many tests."""
    return ALPHA + 3 * max(row["se"] if not math.isnan(row["se"]) else 0.0,
                           math.sqrt(ALPHA * (1 - ALPHA) / row["tests"]))


@pytest.fixture(scope="module")
def realistic() -> pd.DataFrame:
    design = sim.scenario("realistic, 3 x 3", tasks=TASKS, temperatures=(1.0, 2.0))
    return pipeline.simulate(design, n_studies=12, seed=11, batch=12, n_bootstrap=100, n_permutations=199)


def test_type_one_error_of_every_study_mode_family_under_the_realistic_null(realistic):
    table = realistic.set_index("family")
    valid = table[~table.index.str.startswith(pipeline.COMPARISONS)]
    for family, row in valid.iterrows():
        assert row["rate"] <= upper(row), (family, row["rate"], row["tests"])
    # 3 x 3: H1 over 3 students and H2/H4/H5 over 3 teachers cannot reach p < 0.05 and are never tested
    assert not {"H1 sign-flip over students", "H2 Spearman, teachers relabelled",
                "H4 stratified error consistency, teachers relabelled"} & set(valid.index)
    # KD runs that copy their teacher really raise agreement: that family is not under its null here
    assert "H4 KD vs SFT stratified error consistency" not in valid.index


def test_the_replaced_procedures_fail_the_same_simulation(realistic):
    table = realistic.set_index("family")
    # a teacher effect shared by every student passes for a correlation when pairs are permuted within students
    assert table.loc["before: H2 permutation within students", "rate"] > 0.1
    # plain error consistency rises with accuracy once items differ in difficulty
    assert table.loc["before: H4 error consistency, within students", "rate"] > 0.1
    # the better of two temperatures against one SFT draw, rows as units
    assert table.loc["as published: H1 t-test over rows, best temperature", "rate"] > 0.2


def test_power_for_a_true_gain_in_a_five_by_five_design():
    design = sim.scenario("power: gain 3 pp, 5 x 5", tasks=TASKS[:1] + TASKS[2:3], temperatures=(1.0,),
                          gain=10.0, predictions=False)
    table = pipeline.simulate(design, n_studies=4, seed=13, batch=4, n_bootstrap=100, n_permutations=199).set_index(
        "family")
    assert table.loc["H1 sign-flip over students, average task, methods pooled", "rate"] > 0.5
    assert table.loc["bootstrap 95% interval misses the truth", "rate"] < 0.1


def write_files(results: pd.DataFrame, store, directory) -> None:
    """The runner's layout: results.csv and <runs>/<run_id>/predictions/<task>.jsonl."""
    results.to_csv(directory / "results.csv", index=False)
    for (run_id, task), frame in store._tables.items():
        path = directory / "runs" / run_id / "predictions" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = frame.assign(task=task, prompt="", answer="", prediction=frame["prediction"].map(str),
                               correct=frame["correct"].astype(bool))
        path.write_text("".join(json.dumps(r) + "\n" for r in records.to_dict("records")))


def test_simulated_predictions_take_the_files_path(tmp_path):
    """The simulation analyses predictions in memory; written as the runner writes them and read back
    from files, the same study gives the same tables."""
    design = sim.scenario("realistic, 3 x 3", tasks=TASKS[:2], temperatures=(1.0, 2.0))
    results, store = sim.simulate_study(design, np.random.default_rng(3))
    write_files(results, store, tmp_path)
    kwargs = dict(n_bootstrap=100, n_permutations=99, seed=5, mixed_model=False)
    in_memory = study_analysis(results, predictions=store, **kwargs)
    from_files = study_analysis(st.load_results(tmp_path / "results.csv"), predictions=tmp_path / "runs", **kwargs)
    columns = ["improvement", "sft_accuracy_a", "improvement_b", "improvement_selected", "agreement",
               "error_consistency", "error_consistency_stratified", "kappa", "ci_low", "ci_high",
               "sft_accuracy_independent"]
    pd.testing.assert_frame_equal(in_memory.improvements[st.KEYS + columns],
                                  from_files.improvements[st.KEYS + columns], check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(in_memory.tests, from_files.tests, check_exact=False, rtol=1e-9)
    pd.testing.assert_series_equal(in_memory.mcnemar["pvalue"], from_files.mcnemar["pvalue"])
