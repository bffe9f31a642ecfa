"""What ``python -m kd_utils.study run PARAMS --dry-run`` prints below the plan: the cost estimate per stage
(tokens counted by :mod:`kd_utils.costs`, priced with the device's cost table) and what the design can detect.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from kd_utils.constants import ALPHA, STAGES
from kd_utils.cost_table import CostTable, table_device
from kd_utils.costs import (
    _eval_prompts_of,
    estimate,
    longest_chain,
    parallel_wall,
    study_work,
)


def format_estimate(params: dict, runs: list, table: CostTable | None, table_path: Path) -> str:
    """The dry-run's cost block: tokens and (with a cost table) time per stage, and the total."""

    try:
        work = study_work(params, runs)
    except (OSError, ValueError) as err:  # e.g. a hub model's config or tokenizer not on this machine, offline
        return f"estimated cost: token counts unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    n_runs = {s: sum(r.stage == s for r in runs) for s in STAGES}
    n_runs["analysis"] = 1
    tokens: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for w in work:
        tokens[w.stage][w.kind] += w.tokens
    est = estimate(work, table, n_runs) if table else {}
    where = (f"on {table.device}" + (", a table DERIVED from other measurements, not calibrated there"
                                     if table.derived else "")) if table else "no cost table for this device"
    lines = [f"estimated cost ({where}; generated tokens are upper bounds):",
             f"  {'stage':9s} {'runs':>5s} {'train tok':>12s} {'forward tok':>12s} {'generate tok':>12s} {'time':>10s}"]
    total = 0.0
    for stage in STAGES:
        t = tokens[stage]
        secs = est.get(stage, {}).get("seconds")
        total += secs or 0.0
        lines.append(f"  {stage:9s} {n_runs[stage]:5d} {t['train']:12,.0f} {t['forward']:12,.0f} "
                     f"{t['generate']:12,.0f} "
                     f"{_duration(secs):>10s}")
    if table:
        lines.append(f"  {'total':9s} {sum(n_runs.values()):5d} {'':38s} {_duration(total):>10s}  (one run at a time)")
        parallel = params["execution"]["parallel"]
        if parallel > 1:
            chain = longest_chain(work, table, runs)
            wall = parallel_wall(total, chain, parallel)
            lines.append(f"  with execution.parallel = {parallel}: at least {_duration(wall)} "
                         f"(if {parallel} runs share the device without slowing one another; longest chain of "
                         f"dependent runs {_duration(chain)})")
        lines.append(f"  (cost table {table_path}; analysis counted as one run's fixed cost)")
        if table.loadavg:  # rates measured on a loaded machine hold only at that load
            lines.append(f"  (calibrated at load average {table.loadavg[0]:.1f} -> {table.loadavg[1]:.1f}; "
                         f"this machine has {os.cpu_count()} cores and load {os.getloadavg()[0]:.1f} now)")
    else:
        lines.append(f"  no times: no cost table for {table_device()!r} at {table_path}; make one with "
                     "`python -m kd_utils.costs calibrate` (about 2-5 minutes on a CPU)")
    lines.append(design_power_lines(runs, params["models"]["teacher"]))
    return "\n".join(lines)


def design_power_lines(runs: list, tokenizer_model: str, alpha: float = ALPHA) -> str:
    """What the valid procedure (``kd_utils.statistics.hypothesis_tests``) can detect with this design.

    H1 tests students: each one's mean over its KD runs (expert teacher, no noise; every teacher, method,
    temperature and seed) minus the mean of its SFT seeds, on a domain's task average. From binomial sampling
    alone (p = 0.5, the largest variance) that difference has sd 100 * sqrt(v * (1/m + 1/s)), v = mean over the
    domain's tasks of 0.25 / n_task divided by the number of tasks, m KD runs and s SFT runs per student.
    Students' true gains also differ, so the printed power for a 3-point gain is an upper bound.
    Then, per hypothesis, the smallest p-value the design allows and, where it cannot reach alpha, the
    design change that would make it testable (:func:`testability_lines`): the teachers are H2/H4/H5's
    units, the students H1's and H3's.
    """
    from kd_utils.statistics.power import GAIN_OF_INTEREST, ttest_power

    def unit(p: dict) -> tuple:  # one student of the study (its SFT runs are shared by all its teachers)
        return p["model"], p.get("student_layers"), p["domain"]

    students = [r.parameters for r in runs if r.stage == "student"]
    main = [p for p in students if p["method"] != "sft" and p.get("task_aware_teacher") and not p.get("noise_sigma")]
    units = {unit(p) for p in students}
    n_units = len(units)
    kd_per_unit = len(main) / n_units
    sft_per_unit = sum(p["method"] == "sft" for p in students) / n_units
    teachers = {unit(p): set() for p in main}
    for p in main:
        teachers[unit(p)].add((p["teacher"], p["teacher_adapter"]))
    lines = ["  design power (the analysis' valid procedure; sampling sd only, so upper bounds):"]
    if not main or not sft_per_unit:
        return "\n".join(lines + ["    H1: no KD run with an SFT baseline, nothing to test"])
    by_domain: dict[str, list[int]] = defaultdict(list)
    for _task, domain, n, _prompts in _eval_prompts_of(next(r for r in runs if r.stage == "eval"), tokenizer_model):
        by_domain[domain].append(n)
    for domain, ns in by_domain.items():
        variance = sum(0.25 / n for n in ns) / len(ns) ** 2
        sd = 100 * math.sqrt(variance * (1 / kd_per_unit + 1 / sft_per_unit))
        lines.append(f"    H1 {domain}: {n_units} students (each {kd_per_unit:g} KD - {sft_per_unit:g} SFT runs), "
                     f"{len(ns)} tasks, {sum(ns):,} examples: sd {sd:.2f} points, power "
                     f"{ttest_power(n_units, GAIN_OF_INTEREST, sd, alpha):.2f} for a {GAIN_OF_INTEREST:g}-point gain")
    lines += testability_lines(main, students, unit, alpha)
    return "\n".join(lines)


def testability_lines(main: list[dict], students: list[dict], unit, alpha: float) -> list[str]:
    """Per domain, the hypotheses this design cannot test and what would make them testable
    (:func:`kd_utils.statistics.design.design_testability`)."""
    import pandas as pd

    from kd_utils.statistics.design import design_testability

    # a teacher is its model and its fine-tuned adapter (teachers of different budgets share the model)
    pairs = pd.DataFrame([{"domain": unit(p)[2], "student": str(unit(p)),
                           "teacher": str((p["teacher"], p.get("teacher_adapter"))), "method": p["method"]}
                          for p in main])
    kd_seeds = {unit(p): set() for p in main}
    for p in main:
        kd_seeds[unit(p)].add(p.get("seed"))
    spare = {unit(p) for p in students if p["method"] == "sft" and p.get("seed") not in kd_seeds.get(unit(p), set())}
    lines = []
    for domain, dom in pairs.groupby("domain", sort=False):
        table = design_testability(dom, dom["method"].nunique(), bool(spare), alpha)
        for row in table.itertuples():
            lines.append(f"    {row.hypothesis} ({domain}): {row.units}, smallest p {row.min_pvalue:.3g}: "
                         + ("testable" if row.testable else f"NOT testable; needs {row.needs}"))
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
