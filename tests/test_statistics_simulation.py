"""Whole-pipeline null simulations inside `make test`: the study-mode tests hold their level.

A smaller design than the benchmark's (2 tasks per domain, fewer studies) keeps this under a
minute; the tolerances are set from the number of tests each family gets here
(benchmarks/null_simulation.py measures the full design with many more studies).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kd_utils import statistics as st
from kd_utils.analysis import study_analysis
from kd_utils.statistics import simulation as sim

TASKS = (("gsm8k", "math"), ("aqua", "math"), ("boolq", "commonsense"), ("arc_e", "commonsense"))
ALPHA = 0.05
#: families that are exact or conservative by design only get an upper bound
NOT_CONSERVATIVE = {"H1 t-test over students", "McNemar accuracy, per run and task"}


def upper(row: pd.Series) -> float:
    """alpha plus 3 standard errors: the larger of the cluster SE and the binomial SE of this many tests."""
    return ALPHA + 3 * max(row["se"] if not math.isnan(row["se"]) else 0.0, math.sqrt(ALPHA * (1 - ALPHA) / row["tests"]))


@pytest.fixture(scope="module")
def null_counts() -> pd.DataFrame:
    return sim.simulate(sim.Design(predictions=False, tasks=TASKS), n_studies=24, seed=11, batch=24, mixed_every=6)


@pytest.fixture(scope="module")
def null_predictions() -> pd.DataFrame:
    return sim.simulate(sim.Design(tasks=TASKS), n_studies=8, seed=12, batch=8, mixed_every=8)


@pytest.mark.parametrize("which", ["null_counts", "null_predictions"])
def test_type_one_error_of_every_study_mode_family(which, request):
    table = request.getfixturevalue(which).set_index("family")
    valid = table[~table.index.str.startswith(("as published", "naive"))]
    expected = {f for f, (_, needs) in sim.FAMILIES.items() if not f.startswith(("as published", "naive"))
                and (which == "null_predictions" or not needs)}
    # H3 over 3 students can never reach p < 0.05 (6 permutations): it has no tests at all, honestly
    assert expected - set(valid.index) == {"H3 size, Spearman over students", "H3 SFT accuracy (split), over students"}
    for family, row in valid.iterrows():
        assert row["rate"] <= upper(row), (family, row["rate"], row["tests"])
        if family in NOT_CONSERVATIVE:
            assert row["rate"] >= ALPHA - 3 * math.sqrt(ALPHA * (1 - ALPHA) / row["tests"]) - 3 * row["se"], family


def test_the_published_procedure_fails_the_same_simulation(null_counts):
    table = null_counts.set_index("family")
    # the best of three temperatures against one SFT draw, rows as units: far above 5%
    assert table.loc["as published: H1 t-test over rows, best temperature", "rate"] > 0.4
    assert table.loc["as published: H3 SFT accuracy, Spearman over rows", "rate"] > 0.2


def test_power_for_a_true_gain():
    gain = sim.simulate(sim.Design(predictions=False, tasks=TASKS, gain=6.0), n_studies=8, seed=13, batch=8,
                        mixed_every=8).set_index("family")
    # every KD run 6 points better: the t-test over 3 students rejects far more often than 5%,
    # the intervals exclude 0 most of the time and still cover the true gain
    assert gain.loc["H1 t-test over students", "rate"] > 0.3
    assert gain.loc["bootstrap 95% interval excludes 0", "rate"] > 0.5
    assert gain.loc["bootstrap 95% interval misses the truth", "rate"] < 0.1


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
    design = sim.Design(tasks=TASKS[:2], temperatures=(1.0, 2.0))
    results, store = sim.simulate_study(design, np.random.default_rng(3))
    write_files(results, store, tmp_path)
    kwargs = dict(n_bootstrap=100, n_permutations=99, seed=5, mixed_model=False)
    in_memory = study_analysis(results, predictions=store, **kwargs)
    from_files = study_analysis(st.load_results(tmp_path / "results.csv"), predictions=tmp_path / "runs", **kwargs)
    columns = ["improvement", "sft_accuracy_a", "improvement_b", "improvement_selected", "agreement",
               "error_consistency", "kappa", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(in_memory.improvements[st.KEYS + columns],
                                  from_files.improvements[st.KEYS + columns], check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(in_memory.tests, from_files.tests, check_exact=False, rtol=1e-9)
    pd.testing.assert_series_equal(in_memory.mcnemar["pvalue"], from_files.mcnemar["pvalue"])
