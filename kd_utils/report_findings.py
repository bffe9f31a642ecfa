"""The Findings block of the report: one block per domain and hypothesis from the verdict table
(:func:`~kd_utils.statistics.verdicts.verdict_table`), each with its numbers, its test and, in paper mode,
the paper's conclusion; then what the study can and cannot say.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from IPython.display import HTML

from kd_utils.constants import ADEQUATE_POWER

VERDICTS = ("supported", "not supported", "inconclusive", "underpowered", "not testable")
VERDICT_COLUMNS = ("domain", "hypothesis", "claim", "estimate", "ci_low", "ci_high", "pvalue", "power", "n",
                   "verdict")


def _text(row: Mapping, column: str) -> str:
    """An optional text column of a verdict row ('' when absent or missing)."""
    value = row.get(column)
    return value if isinstance(value, str) else ""


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _numbers(row: Mapping) -> str:
    """'estimate (interval of the same test); p (Holm), power; n unit.' of one verdict row."""
    if pd.isna(row["estimate"]):
        parts = ["no estimate"]
    else:
        label = _text(row, "estimate_label") or "estimate"
        interval = (f" (interval {row['ci_low']:+.2f} to {row['ci_high']:+.2f})"
                    if pd.notna(row["ci_low"]) and pd.notna(row["ci_high"]) else "")
        parts = [f"{label} {row['estimate']:+.2f}{interval}"]
    p = "p not computed" if pd.isna(row["pvalue"]) else _format_p(row["pvalue"])
    if pd.notna(row.get("pvalue_holm", math.nan)):
        p += f" (Holm {_format_p(row['pvalue_holm']).removeprefix('p ')})"
    if pd.notna(row["power"]):
        p += f", power {row['power']:.2f}" + (f" for {row['effect_of_interest']}"
                                             if pd.notna(row.get("effect_of_interest", math.nan)) else "")
    return f"{parts[0]}; {p}; {_units(row)}."


def _units(row: Mapping) -> str:
    n = "?" if pd.isna(row["n"]) else f"{int(row['n'])}"
    return f"n = {n}" + (f" {_text(row, 'unit')}" if _text(row, "unit") else "")


def _survives(value: Any) -> str:
    if value is True or value is False:
        return "survives the valid procedure" if value else "does not survive the valid procedure"
    return f"survives the valid procedure: {value}" if isinstance(value, str) and value else ""


def _can_say(verdicts: pd.DataFrame) -> str:
    """'What this study can and cannot say', from the verdicts, power and n."""
    def names(rows: pd.DataFrame, detail: bool = False) -> str:
        return "; ".join(f"{r['hypothesis']} ({r['domain']}" + (
            f": power {r['power']:.2f}, {_units(r)}" if detail and pd.notna(r["power"]) else
            f": {_units(r)}" if detail else "") + ")" for r in rows.to_dict("records"))

    by = {v: verdicts[verdicts["verdict"] == v] for v in VERDICTS}
    sentences = []
    if len(by["supported"]):
        sentences.append(f"It finds evidence for {names(by['supported'])}.")
    if len(by["not supported"]):
        sentences.append("It rules out the effect of interest, or finds the opposite, in "
                         f"{names(by['not supported'])}.")
    if len(by["inconclusive"]):
        sentences.append(f"Powered for the effect of interest, it still cannot decide {names(by['inconclusive'])}.")
    if len(by["underpowered"]):
        sentences.append(f"It has too few units to detect the effect of interest in "
                         f"{names(by['underpowered'], True)}: a non-significant result there is not evidence of "
                         "no effect.")
    if len(by["not testable"]):
        sentences.append(f"It cannot test {names(by['not testable'], True)}: too few units, no variation, or no "
                         "measurements.")
    powered = verdicts["power"].dropna()
    if len(powered):
        sentences.append(f"{int((powered >= ADEQUATE_POWER).sum())} of {len(powered)} tests have power of at "
                         f"least {ADEQUATE_POWER}.")
    return "<p class=\"kd-can-say\"><b>What this study can and cannot say.</b> " + html.escape(" ".join(sentences)) \
        + "</p>"


def findings_block(verdicts: pd.DataFrame) -> HTML:
    """The Findings: one block per domain and hypothesis from the verdict table, then what the study can say.

    ``verdicts`` has the columns of :data:`VERDICT_COLUMNS` (``verdict`` one of :data:`VERDICTS`) and may
    have ``estimate_label`` (what the estimate is, with its unit), ``test`` (the test's name), ``unit`` (what
    n counts), ``pvalue_holm``, ``effect_of_interest`` (what the power is for), ``reason`` (why the verdict)
    and, in paper mode, ``paper_conclusion`` (the paper's reported conclusion, "not tested" where it has none),
    ``published`` (the statistic it rests on) and ``survives`` (whether it survives the valid procedure: a bool
    or a sentence).
    """
    missing = [c for c in VERDICT_COLUMNS if c not in verdicts.columns]
    if missing:
        raise ValueError(f"verdict table lacks column(s) {', '.join(missing)}; expected {', '.join(VERDICT_COLUMNS)}")
    unknown = sorted(set(verdicts["verdict"]) - set(VERDICTS))
    if unknown:
        raise ValueError(f"verdict table: unknown verdict(s) {unknown}; expected one of {', '.join(VERDICTS)}")
    parts = []
    for domain, rows in verdicts.groupby("domain", sort=False):
        parts.append(f"<h3>{html.escape(str(domain))}</h3>")
        for row in rows.to_dict("records"):
            reason = f" <span class=\"kd-meta\">({html.escape(_text(row, 'reason'))})</span>" if _text(row, "reason") \
                else ""
            test = f"<p>Test: {html.escape(_text(row, 'test'))}.</p>" if _text(row, "test") else ""
            paper = ""
            if _text(row, "paper_conclusion") and row["paper_conclusion"] != "not tested":
                survives = _survives(row.get("survives"))
                published = f" with {_text(row, 'published')}" if _text(row, "published") else ""
                paper = (f"<p>The paper: {html.escape(row['paper_conclusion'] + published)}"
                         + (f" &mdash; <b>{html.escape(survives)}</b>" if survives else "") + ".</p>")
            parts.append(
                f"<div class=\"kd-finding kd-{row['verdict'].replace(' ', '-')}\">"
                f"<p><b>{html.escape(str(row['hypothesis']))}</b>"
                + (" (secondary)" if _text(row, "family") == "secondary" else "")
                + f": {html.escape(str(row['claim']))} "
                f"&mdash; <span class=\"kd-verdict\">{html.escape(row['verdict'])}</span>{reason}</p>"
                f"<p>{html.escape(_numbers(row))}</p>{test}{paper}</div>")
    return HTML("<div class=\"kd-findings\">" + "".join(parts) + _can_say(verdicts) + "</div>")
