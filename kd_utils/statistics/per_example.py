"""Per-example inference: the selection/estimation split of each test set, bootstrap intervals, McNemar.

The split makes two things honest. (1) The paper's "best temperature": chosen on the
selection half A of every test set, estimated on the estimation half B, so the estimate
never reads the data that chose it. (2) ``sft_accuracy_a`` / ``improvement_b``: the SFT
accuracy on A and the improvement on B remove the test set's sampling noise from H3's
slope, but not the SFT run's own training deviation, which enters both; H3 therefore uses
an SFT accuracy measured apart from the gain
(:func:`~kd_utils.statistics.improvements.independent_sft_accuracy`), and the split
columns are kept for comparison. With per-example predictions the split is of
the examples themselves (the same half for every run). With only results.csv the SFT
counts are split by a hypergeometric draw, which is distributed exactly like the
number of correct examples in a random half when example outcomes are independent;
there is then no selection estimate (the halves of different runs are not the same
examples).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kd_utils.predictions import Predictions, as_predictions
from kd_utils.statistics.improvements import KEYS, main_pairs
from kd_utils.statistics.multiple_testing import holm_adjust

SPLIT_EXAMPLES = "examples"  # halves of the examples themselves (predictions)
SPLIT_COUNTS = "counts"  # hypergeometric halves of n/correct (results.csv only)
PAIRED_BASIS = "paired bootstrap over examples"
UNPAIRED_BASIS = "bootstrap of per-run counts (unpaired)"
NO_BASIS = "no per-example data"


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(k.encode()) for k in keys])


def example_split(ids: Sequence[str], task: str, seed: int = 0) -> np.ndarray:
    """True for the examples of the selection half A (floor(n/2) of them), False for half B.

    A seeded permutation of the sorted distinct ids, so every run's file of a task
    gets the same halves whatever its order.
    """
    ids = np.asarray([str(i) for i in ids])
    distinct = np.unique(ids)
    chosen = distinct[_rng(seed, "split", task).permutation(distinct.size)[: distinct.size // 2]]
    return np.isin(ids, chosen)


def _task_outcomes(predictions: Predictions | None, run_ids: Sequence[str], task: str
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, 0/1 matrix examples x runs) on the examples every run has, or None if a file is missing."""
    if predictions is None:
        return None
    outcomes = predictions.aligned(run_ids, task, "correct")
    return None if outcomes is None else (outcomes[0], outcomes[1].astype(float))


def split_counts(results: pd.DataFrame, predictions=None, seed: int = 0) -> pd.DataFrame:
    """Correct counts on the halves A and B of every (run, task), ``average`` excluded.

    Columns run_id, task, n_a, correct_a, n_b, correct_b, split (``examples`` from the
    predictions of every run of the task, ``counts`` from a seeded hypergeometric draw
    of n/correct; rows without either are left out).
    """
    predictions = as_predictions(predictions)
    rows = []
    for task, part in results[results["task"] != "average"].groupby("task", sort=False):
        run_ids = part["run_id"].astype(str).tolist()
        outcomes = _task_outcomes(predictions, run_ids, task)
        if outcomes is not None:
            ids, matrix = outcomes
            in_a = example_split(ids, task, seed)
            for j, run_id in enumerate(run_ids):
                rows.append((run_id, task, int(in_a.sum()), matrix[in_a, j].sum(), int((~in_a).sum()),
                             matrix[~in_a, j].sum(), SPLIT_EXAMPLES))
            continue
        for run_id, n, correct in zip(run_ids, part["n"], part["correct"]):
            if pd.isna(n) or pd.isna(correct) or n < 2:
                continue
            n, correct, n_a = int(n), int(correct), int(n) // 2
            correct_a = int(_rng(seed, "thin", run_id, task).hypergeometric(correct, n - correct, n_a))
            rows.append((run_id, task, n_a, correct_a, n - n_a, correct - correct_a, SPLIT_COUNTS))
    columns = ["run_id", "task", "n_a", "correct_a", "n_b", "correct_b", "split"]
    return pd.DataFrame(rows, columns=columns)


def split_estimates(results: pd.DataFrame, improvements: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Add the split-based columns to a mean-over-temperatures improvement table.

    - ``sft_accuracy_a``: the student's SFT accuracy on half A (H3's x);
    - ``improvement_b``: the mean over temperatures of KD minus SFT on half B
      (KD on all examples when the split is of counts, so that it is not the same
      examples as A anyway), the y of H3 against SFT accuracy;
    - ``selected_temperature`` / ``improvement_selected`` (example splits only): the
      temperature with the best KD accuracy on A (ties to the lower), and its
      improvement on B, an honest estimate of the paper's "best temperature".
    ``average`` rows: means over the domain's tasks, the temperature chosen by the
    mean accuracy on A over tasks. Rows without split data get NaN.
    """
    pairs = main_pairs(results)
    pairs = pairs[pairs["task"] != "average"]
    acc = split.assign(acc_a=100 * split["correct_a"] / split["n_a"], acc_b=100 * split["correct_b"] / split["n_b"])
    acc = acc.set_index(["run_id", "task"])
    kd = acc[["acc_a", "acc_b", "split"]].add_prefix("kd_")
    sft = acc[["acc_a", "acc_b", "split"]].add_prefix("sft_")
    data = (pairs.join(kd, on=["run_id", "task"]).join(sft, on=["sft_run_id", "task"])
            .dropna(subset=["sft_acc_a"]))
    examples = (data["kd_split"] == SPLIT_EXAMPLES) & (data["sft_split"] == SPLIT_EXAMPLES)
    data = data.assign(kd_est=np.where(examples, data["kd_acc_b"], data["accuracy"]), examples=examples)
    by_temp = (data.groupby(KEYS + ["temperature"])
               .agg(kd_a=("kd_acc_a", "mean"), kd_b=("kd_acc_b", "mean"), kd_est=("kd_est", "mean"),
                    sft_a=("sft_acc_a", "mean"), sft_b=("sft_acc_b", "mean"), examples=("examples", "all"))
               .reset_index())
    domain_tasks = results[results["task"] != "average"].groupby("domain")["task"].nunique()
    unit = ["domain", "teacher", "student", "method"]
    complete = (by_temp.groupby(unit + ["temperature"])["task"].transform("nunique")
                == by_temp["domain"].map(domain_tasks))
    average = (by_temp[complete].groupby(unit + ["temperature"])
               .agg({"kd_a": "mean", "kd_b": "mean", "kd_est": "mean", "sft_a": "mean", "sft_b": "mean",
                     "examples": "all"}).reset_index().assign(task="average"))
    by_temp = pd.concat([by_temp, average], ignore_index=True)
    by_temp = by_temp.assign(diff_b=by_temp["kd_b"] - by_temp["sft_b"], diff_est=by_temp["kd_est"] - by_temp["sft_b"])
    table = (by_temp.groupby(KEYS).agg(sft_accuracy_a=("sft_a", "mean"), improvement_b=("diff_est", "mean"),
                                       examples=("examples", "all")).reset_index())
    # the best temperature on A, ties to the lower one
    best = (by_temp.sort_values(["kd_a", "temperature"], ascending=[False, True], kind="stable")
            .groupby(KEYS).head(1)[KEYS + ["temperature", "diff_b"]]
            .rename(columns={"temperature": "selected_temperature", "diff_b": "improvement_selected"}))
    table = table.merge(best, on=KEYS, how="left")
    table.loc[~table["examples"].astype(bool), ["selected_temperature", "improvement_selected"]] = np.nan
    columns = KEYS + ["sft_accuracy_a", "improvement_b", "selected_temperature", "improvement_selected"]
    table = table[columns]
    return improvements.drop(columns=[c for c in columns[len(KEYS):] if c in improvements]).merge(
        table, on=KEYS, how="left")


# --------------------------------------------------------------------------- bootstrap


def _cell_weights(results: pd.DataFrame, improvements: pd.DataFrame) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The (run, task) cells and the rows x cells weights such that weights @ accuracies = improvements.

    Mirrors :func:`kd_utils.statistics.improvements.improvement_table`: KD minus same-seed
    SFT per run, seeds averaged per temperature, temperatures averaged (NaN temperature)
    or the row's own temperature, ``average`` rows averaged over the domain's tasks.
    """
    pairs = main_pairs(results)
    pairs = pairs[pairs["task"] != "average"][KEYS + ["temperature", "run_id", "sft_run_id"]]
    rows = improvements[KEYS + ["temperature"]].reset_index(drop=True).rename(columns={"temperature": "row_t"})
    rows["row"] = np.arange(len(rows))
    unit = ["domain", "teacher", "student", "method"]
    per_task = rows[rows["task"] != "average"].merge(pairs, on=KEYS)
    average = rows[rows["task"] == "average"].drop(columns="task").merge(pairs, on=unit)
    links = pd.concat([per_task, average], ignore_index=True)
    links = links[links["row_t"].isna() | np.isclose(links["temperature"], links["row_t"].fillna(0.0))]
    if links.empty:
        return [], np.zeros((len(improvements), 0))
    n_tasks = links.groupby("row")["task"].transform("nunique")
    n_temps = links.groupby(["row", "task"])["temperature"].transform("nunique")
    n_seeds = links.groupby(["row", "task", "temperature"])["run_id"].transform("size")
    weight = 1.0 / (n_tasks * n_temps * n_seeds)
    cells = pd.concat([links[["run_id", "task"]], links[["sft_run_id", "task"]].set_axis(["run_id", "task"], axis=1)])
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(cells.astype(str)))
    weights = np.zeros((len(improvements), len(uniques)))
    np.add.at(weights, (np.concatenate([links["row"], links["row"]]), codes),
              np.concatenate([weight.to_numpy(), -weight.to_numpy()]))
    return list(uniques), weights


def _replicates(results: pd.DataFrame, cells: list[tuple[str, str]], predictions: Predictions | None,
                n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicate accuracies (resamples x cells, percent) and whether each cell was paired.

    Per task, when every needed run has predictions, the examples are resampled once
    (multinomial weights shared by all runs: the test set is resampled); otherwise each
    run's n/correct is resampled on its own (binomial); NaN when neither is known.
    """
    counts = results.set_index(["run_id", "task"])[["n", "correct"]]
    out = np.full((n_resamples, len(cells)), np.nan)
    paired = np.zeros(len(cells), bool)
    by_task: dict[str, list[int]] = {}
    for j, (_, task) in enumerate(cells):
        by_task.setdefault(task, []).append(j)
    for task, columns in by_task.items():
        outcomes = _task_outcomes(predictions, [cells[j][0] for j in columns], task)
        if outcomes is not None and len(outcomes[0]):
            matrix = outcomes[1]
            weights = rng.multinomial(matrix.shape[0], np.full(matrix.shape[0], 1.0 / matrix.shape[0]), n_resamples)
            out[:, columns] = 100.0 * (weights @ matrix) / matrix.shape[0]
            paired[columns] = True
            continue
        known = counts.reindex(pd.MultiIndex.from_tuples([cells[j] for j in columns])).to_numpy(float)
        ok = ~np.isnan(known).any(axis=1) & (np.nan_to_num(known[:, 0]) > 0)
        if ok.any():
            n, correct = known[ok, 0].astype(int), known[ok, 1]
            out[:, np.asarray(columns)[ok]] = 100.0 * rng.binomial(n, correct / n, (n_resamples, n.size)) / n
    return out, paired


def improvement_intervals(results: pd.DataFrame, improvements: pd.DataFrame, predictions=None,
                          n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Add bootstrap ``ci_low``/``ci_high`` (percentage points) and ``ci_basis`` to every improvement row.

    Percentile intervals of the row's own improvement (temperature rule included),
    reflecting test-set sampling only, not training-seed variation: paired over examples
    when every needed prediction file exists (``predictions``: a runs directory or a
    :class:`~kd_utils.predictions.Predictions`), otherwise independent resampling of each
    run's n/correct; NaN when neither is known (the paper's results).
    """
    predictions = as_predictions(predictions)
    cells, weights = _cell_weights(results, improvements)
    replicates, paired = _replicates(results, cells, predictions, n_resamples, np.random.default_rng(seed))
    used = weights != 0
    values = np.nan_to_num(replicates) @ weights.T  # rows reading an unknown cell are dropped below
    known = ~np.isnan(replicates).any(axis=0)
    ok = used.any(axis=1) & ~(used & ~known).any(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.where(ok, np.quantile(values, [alpha, 1.0 - alpha], axis=0), np.nan)
    all_paired = ~(used & ~paired).any(axis=1)
    basis = np.where(~ok, NO_BASIS, np.where(all_paired, PAIRED_BASIS, UNPAIRED_BASIS))
    return improvements.assign(ci_low=low, ci_high=high, ci_basis=basis)


# --------------------------------------------------------------------------- McNemar


def mcnemar_pvalues(only_a: np.ndarray, only_b: np.ndarray) -> np.ndarray:
    """Exact two-sided McNemar p-values from discordant counts: 2 P(Binom(b + c, 1/2) <= min(b, c)), at most 1."""
    only_a, only_b = np.asarray(only_a, int), np.asarray(only_b, int)
    return np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(only_a, only_b), only_a + only_b, 0.5))


def mcnemar_test(kd_correct: Sequence[bool], sft_correct: Sequence[bool]) -> dict[str, float]:
    """Exact (binomial) McNemar test of KD vs SFT on the same examples.

    Exact rather than chi-square because the discordant counts of small test sets are
    often small. Returns n, kd_only (KD right, SFT wrong), sft_only, statistic
    (min(kd_only, sft_only), as statsmodels' exact test) and the two-sided p-value.
    """
    kd = np.asarray(kd_correct, dtype=bool)
    sft = np.asarray(sft_correct, dtype=bool)
    if kd.shape != sft.shape:
        raise ValueError(f"McNemar needs paired examples: {kd.size} KD vs {sft.size} SFT outcomes")
    kd_only, sft_only = int(np.sum(kd & ~sft)), int(np.sum(~kd & sft))
    return {"n": int(kd.size), "kd_only": kd_only, "sft_only": sft_only, "statistic": float(min(kd_only, sft_only)),
            "pvalue": float(mcnemar_pvalues(kd_only, sft_only))}


def paired_difference(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy of a minus accuracy of b on the same examples, in points: the difference, its 95%
    interval for paired proportions and the exact McNemar p-value.

    The interval is Agresti & Min's (2005): the Wald interval after adding 1/2 to each of the
    four cells, d' +- 1.96 sqrt(b' + c' - (b' - c')^2 / n') / n' with b' = b + 1/2, c' = c + 1/2,
    n' = n + 2 (b, c the discordant counts). The plain Wald interval has zero width when no
    example is discordant, claiming certainty that the accuracies are equal."""
    test = mcnemar_test(a_correct, b_correct)
    n, only_a, only_b = test["n"], test["kd_only"], test["sft_only"]
    d = (only_a - only_b) / n
    b, c, m = only_a + 0.5, only_b + 0.5, n + 2
    centre = (b - c) / m
    half = 1.96 * math.sqrt(max(b + c - (b - c) ** 2 / m, 0.0)) / m
    return {"difference": 100 * d, "ci_low": 100 * (centre - half), "ci_high": 100 * (centre + half), "n": n,
            "a_only": only_a, "b_only": only_b, "pvalue": test["pvalue"]}


MCNEMAR_FAMILY = ("domain", "teacher", "student", "method")


def mcnemar_tests(results: pd.DataFrame, predictions) -> pd.DataFrame:
    """Exact McNemar test of every KD run against its SFT run, per task, on the examples both have.

    Every temperature and seed is tested (nothing is selected), and Holm adjusts
    across the tasks, temperatures and seeds of each (domain, teacher, student,
    method). Rows whose prediction files are missing are skipped.
    """
    predictions = as_predictions(predictions)
    pairs = main_pairs(results)
    rows = []
    for row in pairs[pairs["task"] != "average"].to_dict("records"):
        outcomes = _task_outcomes(predictions, [row["run_id"], row["sft_run_id"]], row["task"])
        if outcomes is None:
            continue
        kd, sft = outcomes[1].T.astype(bool)
        rows.append({k: row[k] for k in KEYS + ["temperature", "seed", "run_id", "sft_run_id"]}
                    | {"n": kd.size, "kd_only": int(np.sum(kd & ~sft)), "sft_only": int(np.sum(~kd & sft))})
    columns = KEYS + ["temperature", "seed", "run_id", "sft_run_id", "n", "kd_only", "sft_only"]
    out = pd.DataFrame(rows, columns=columns)
    out["statistic"] = np.minimum(out["kd_only"], out["sft_only"]).astype(float)
    out["pvalue"] = mcnemar_pvalues(out["kd_only"], out["sft_only"]) if len(out) else []
    return holm_adjust(out, family=MCNEMAR_FAMILY)
