"""The blocks of the analysis notebook's report, each an ``IPython.display.HTML``: :func:`table` and :func:`fold`
(no pandas row numbers or run hashes, text in full; long tables under ``<details>`` with a link to their CSV),
:func:`improvement_summary` (the short view of the improvements), :func:`study_banner` (the small-study
banner, from :func:`~kd_utils.statistics.design.study_design`) and :func:`report_title`. The findings block is
:mod:`kd_utils.report_findings`, the provenance block :mod:`kd_utils.provenance`; the page they make is
rendered by :mod:`kd_utils.report`.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from IPython.display import HTML

from kd_utils.constants import ADEQUATE_POWER
from kd_utils.statistics.results import method_label

SMALL_N = 100  # examples per task below which a study is "tiny": one accuracy's 95% interval is wider than +-10 points
_HASH_COLUMN = re.compile(r"(^|_)run_id$")


def _number(value: float) -> str:
    return f"{value:.4g}"


def table(frame: pd.DataFrame) -> HTML:
    """A table without pandas row numbers or run hashes (``run_id``, ``*_run_id``), every cell in full
    (pandas cuts text at 50 characters), methods with the paper's names; an index is shown as columns."""
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    frame = frame.drop(columns=[c for c in frame.columns if _HASH_COLUMN.search(str(c))])
    if "method" in frame.columns:
        frame = frame.assign(method=[method_label(m) if isinstance(m, str) else m for m in frame["method"]])
    with pd.option_context("display.max_colwidth", None):
        body = frame.to_html(index=False, border=0, classes="dataframe kd-table", na_rep="", float_format=_number)
    return HTML(body)


def link(path: str | Path, report_dir: str | Path) -> str:
    """``path`` relative to the directory the report is read from (what an href in the report needs)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(report_dir).resolve())).as_posix()


def fold(frame: pd.DataFrame, summary: str, csv: str | Path | None = None,
         report_dir: str | Path | None = None) -> HTML:
    """A long table folded under ``<details>``: the one-line ``summary``, the row count and a link to ``csv``
    (relative to ``report_dir``, default the CSV's own directory) stay visible."""
    meta = f"{len(frame)} rows"
    if csv is not None:
        href = link(csv, report_dir if report_dir is not None else Path(csv).parent)
        meta += f"; <a href=\"{html.escape(href)}\">{html.escape(Path(csv).name)}</a>"
    return HTML(f"<details class=\"kd-fold\"><summary>{html.escape(summary)} <span class=\"kd-meta\">({meta})"
                f"</span></summary>{table(frame).data}</details>")


def improvement_summary(improvements: pd.DataFrame) -> pd.DataFrame:
    """The average improvement (pp) of every teacher -> student pair, a column per method, with the bootstrap
    interval where the table has one: the short view of improvements.csv's ``average`` rows."""
    rows = improvements[improvements["task"] == "average"]
    has_ci = "ci_low" in rows and rows["ci_low"].notna().any()

    def cell(row: pd.Series) -> str:
        text = f"{row['improvement']:+.1f}"
        return text + (f" [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]" if has_ci and pd.notna(row["ci_low"]) else "")

    rows = rows.assign(cell=rows.apply(cell, axis=1), method=rows["method"].map(method_label))
    wide = rows.pivot_table(index=["domain", "teacher", "student"], columns="method", values="cell",
                            aggfunc="first", sort=False)
    sft = rows.groupby(["domain", "teacher", "student"], sort=False)["sft_accuracy"].first()
    wide.insert(0, "student SFT accuracy (%)", sft.map("{:.1f}".format))
    wide.columns.name = None
    return wide.reset_index().fillna("")


def study_banner(design: pd.DataFrame, power: Iterable[float] | None = None, description: str = "",
                 design_href: str | None = None, small_n: int = SMALL_N) -> HTML | None:
    """The banner at the top of a small study's report (None when the study is not small), from
    :func:`study_design` (linked as ``design_href``): what the study is for and which numbers to expect at its n.

    Shown when n per task is below ``small_n`` in some domain, or when a power is below 0.8: ``power``
    (the verdict table's power column: each test's power for its effect of interest) or else the design's
    H1 power for a medium effect.
    """
    tests, effect = (("primary tests", "their effect of interest (see Findings)") if power is not None else
                     ("H1 t-tests over students (one per domain)", "a medium effect"))
    powers = [p for p in (design["h1_power_medium_effect"] if power is None else power) if pd.notna(p)]
    low_power = [p for p in powers if p < ADEQUATE_POWER]
    sizes = design.dropna(subset=["n_per_task"])
    tiny = sizes[sizes["n_per_task"] < small_n]
    fewer = design[design["paper_tasks_missing"].fillna("") != ""] if "paper_tasks_missing" in design else design[:0]
    if tiny.empty and not low_power and fewer.empty:
        return None
    pairs = ", ".join(f"{r.pairs} in {r.domain}" for r in design.itertuples())
    n_text = ", ".join(f"{r.n_per_task:g} in {r.domain}" for r in sizes.itertuples())
    facts = (f"students with KD and SFT runs: {design['students'].max()}; teacher-student pairs: {pairs or 'none'}"
             + (f"; median test examples per task: {n_text}" if n_text else ""))
    parts = [f"<p><b>Fewer tasks than the paper.</b> The {r.domain} average covers {r.tasks} of the paper's "
             f"{r.tasks + len(r.paper_tasks_missing.split(', '))} {r.domain} tasks; missing: "
             f"{html.escape(r.paper_tasks_missing)}. Compare it with the paper's numbers only over the same "
             f"{r.tasks} tasks.</p>" for r in fewer.itertuples()]
    if len(tiny):
        smallest = tiny.loc[tiny["n_per_task"].idxmin()]
        lead = f"{html.escape(description.rstrip('.'))}. " if description else ""
        parts.append(f"<p><b>A tiny study: it checks that every stage runs, it cannot answer H1-H5.</b> {lead}"
                     f"It has {facts}.</p>")
        parts.append(f"<p>What to expect at n = {smallest['n_per_task']:g}: one accuracy has a 95% interval of "
                     f"about &plusmn;{smallest['ci_half_width_pp']:.0f} points; a KD-minus-SFT difference on a task "
                     f"moves by up to &plusmn;{smallest['difference_2sd_pp']:.0f} points (two standard deviations) "
                     f"from sampling alone, and a true difference must be about "
                     f"{smallest['detectable_difference_pp']:.0f} points to be detected with 80% power.</p>")
        for r in design.itertuples():
            if r.zero_accuracies == r.student_accuracies:
                parts.append(f"<p>Accuracies of 0 are expected: every student scores 0% on every {r.domain} "
                             "task.</p>")
            elif r.zero_accuracies > r.student_accuracies / 2:
                parts.append(f"<p>{r.zero_accuracies} of {r.student_accuracies} student accuracies on {r.domain} "
                             "tasks are 0%.</p>")
    elif low_power:
        parts.append(f"<p><b>Few units per test.</b> This analysis has {facts}.</p>")
    if low_power:
        parts.append(f"<p>{len(low_power)} of {len(powers)} {tests} have power below {ADEQUATE_POWER} (as low as "
                     f"{min(low_power):.2f}) to detect {effect}: their non-significant results are not "
                     "evidence of no effect.</p>")
    if design_href:
        parts.append(f"<p class=\"kd-meta\">These numbers per domain: <a href=\"{html.escape(design_href)}\">"
                     f"{html.escape(Path(design_href).name)}</a></p>")
    return HTML("<div class=\"kd-banner\">" + "".join(parts) + "</div>")


def report_title(results_source: str, results: pd.DataFrame) -> str:
    """The page title: the study's name, or the paper's published results."""
    if results_source == "paper":
        return "kd-study report: the paper's published results (Ramesh et al., ACL Findings 2025)"
    names = [str(s) for s in dict.fromkeys(results["study"]) if pd.notna(s)] if "study" in results else []
    return f"kd-study report: study {', '.join(names) or 'without a name'}"
