"""The findings: one verdict per domain and hypothesis H1-H5, generated from the valid tests' numbers.

Each verdict reads the hypothesis' primary test (task ``average``, methods pooled). The
study pre-registers its primary hypotheses (default: the paper's claims, H1, H2, H3 size,
H3 SFT accuracy, H4, H5); Holm adjusts across the domain's testable primaries, and the
other tests (the methods differ; KD raises agreement over SFT) are reported apart as
secondary, with a Holm adjustment of their own.

- **supported**: significant (Holm) at alpha, in the claimed direction where the claim has one;
- **not supported**: not significant, and the interval excludes the effect of interest
  (a 3-point gain), or significant in the opposite direction;
- **underpowered**: not significant, power below 0.8 for the effect of interest;
- **inconclusive**: not significant although powered, the interval still holds the effect;
- **not testable**: no p-value: too few units for the smallest attainable p to reach
  alpha (the note says which design change would make it testable), constant data, or
  missing measurements. A test that is not testable by design is left out of the Holm family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kd_utils.constants import ADEQUATE_POWER, ALPHA
from kd_utils.statistics.multiple_testing import holm
from kd_utils.statistics.power import GAIN_OF_INTEREST, MEDIUM_EFFECT

#: hypothesis id -> (claim in words, claimed direction: "greater", "less" or None for any, effect of interest or None)
CLAIMS = {
    "H1_improvement_ttest": ("KD improves the student over its SFT baseline", "greater", GAIN_OF_INTEREST),
    "H1_method_friedman": ("the KD methods (fkl, rkl, gkd) differ in improvement", None, None),
    "H2_teacher_performance": ("the gain depends on the teacher's accuracy", None, MEDIUM_EFFECT["spearman"]),
    "H3_student_size": ("smaller students gain more (the paper's claim)", "less", MEDIUM_EFFECT["spearman"]),
    "H3_student_sft": ("weaker students (lower accuracy measured apart from the gain) gain more (the paper's claim)",
                       "less", MEDIUM_EFFECT["spearman"]),
    "H4_agreement": ("the gain tracks teacher-student agreement beyond item difficulty", None,
                     MEDIUM_EFFECT["spearman"]),
    "H4_kd_vs_sft": ("KD raises the student's agreement with its teacher over SFT", "greater", None),
    "H5_fidelity": ("the gain tracks reasoning fidelity (rationale BLEU with the teacher)", None,
                    MEDIUM_EFFECT["spearman"]),
}
#: the paper's claims: the default pre-registered primary family (params key analysis.primary_hypotheses)
PRIMARY_HYPOTHESES = ("H1_improvement_ttest", "H2_teacher_performance", "H3_student_size", "H3_student_sft",
                      "H4_agreement", "H5_fidelity")
#: reported apart, labelled secondary
SECONDARY_HYPOTHESES = ("H1_method_friedman", "H4_kd_vs_sft")
#: what each primary test's estimate is, with its unit
ESTIMATE_LABELS = {
    "H1_improvement_ttest": "mean improvement (pp)",
    "H1_method_friedman": "Kendall's W",
    "H4_kd_vs_sft": "mean agreement gain (pp)",
}
VERDICT_COLUMNS = ["domain", "hypothesis", "family", "claim", "test", "unit", "n", "estimate_label", "estimate",
                   "ci_low", "ci_high", "pvalue", "pvalue_holm", "power", "effect_of_interest", "verdict", "reason"]
#: why a hypothesis can have no test at all
MISSING_REASONS = {
    "H4_agreement": "no agreement measurements (needs per-example predictions of teacher and students)",
    "H4_kd_vs_sft": "no agreement measurements of SFT and KD students (needs per-example predictions)",
    "H5_fidelity": "no rationale BLEU test (needs predictions; the paper tests BLEU on math only)",
    "H3_student_sft": "no SFT accuracy measured apart from the gain (needs the untuned base model's results or a "
                      "second SFT seed per student)",
}


def _excludes(row: pd.Series, effect: float | None) -> bool:
    """Whether the interval rules out the effect of interest (a gain of ``effect``, or |rho| >= effect)."""
    if effect is None or pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return False
    if row["hypothesis"] == "H1_improvement_ttest":
        return row["ci_high"] < effect
    return -effect < row["ci_low"] and row["ci_high"] < effect


def verdict(row: pd.Series, alpha: float = ALPHA) -> tuple[str, str]:
    """(verdict, reason) of one primary test row with ``pvalue_holm`` (see the module docstring)."""
    _, direction, effect = CLAIMS.get(row["hypothesis"], ("", None, None))
    if pd.isna(row["pvalue"]):
        return "not testable", str(row.get("note") or "no p-value")
    p = row["pvalue_holm"]
    right_way = direction is None or (row["estimate"] > 0 if direction == "greater" else row["estimate"] < 0)
    if p < alpha and right_way:
        return "supported", f"p (Holm) = {p:.3g} < {alpha}"
    if p < alpha:
        return "not supported", f"significant in the opposite direction (p (Holm) = {p:.3g})"
    if direction == "greater" and row["ci_high"] < 0:
        return "not supported", f"the interval lies below 0 (p (Holm) = {p:.3g})"
    if _excludes(row, effect):
        return "not supported", f"p (Holm) = {p:.3g}; the interval excludes {row['effect_of_interest']}"
    if not row["power"] >= ADEQUATE_POWER:
        power = "unknown" if pd.isna(row["power"]) else f"{row['power']:.2f}"
        return "underpowered", f"p (Holm) = {p:.3g}; power {power} < {ADEQUATE_POWER} for {row['effect_of_interest']}"
    return "inconclusive", f"p (Holm) = {p:.3g} although powered; the interval still holds {row['effect_of_interest']}"


def verdict_table(tests: pd.DataFrame, alpha: float = ALPHA, domains: list[str] | None = None,
                  primaries: Sequence[str] | None = None) -> pd.DataFrame:
    """Per domain and hypothesis H1-H5: the claim, the primary test's estimate, interval, p, power and verdict.

    ``tests`` are study-mode tests (:func:`~kd_utils.statistics.hypothesis_tests.study_hypothesis_tests`,
    :func:`~kd_utils.statistics.hypothesis_tests.agreement_gain_tests`). The test of a
    hypothesis is the ``average`` task with methods pooled. ``primaries`` (default
    ``PRIMARY_HYPOTHESES``) form the pre-registered family: ``pvalue_holm`` is Holm across
    the domain's testable primaries; the rest (``family`` "secondary") get Holm among
    themselves. A hypothesis without any test row is "not testable" with the reason.
    """
    primaries = tuple(PRIMARY_HYPOTHESES if primaries is None else primaries)
    unknown = [h for h in primaries if h not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown primary hypothesis {unknown[0]!r}; expected ids from {', '.join(CLAIMS)}")
    domains = domains or list(dict.fromkeys(tests["domain"]))
    primary = tests[(tests["task"] == "average") & (tests["method"] == "all")].set_index(["domain", "hypothesis"])
    order = list(primaries) + [h for h in CLAIMS if h not in primaries]
    rows = []
    for domain in domains:
        block = []
        for hypothesis in order:
            claim = CLAIMS[hypothesis][0]
            family = "primary" if hypothesis in primaries else "secondary"
            if (domain, hypothesis) in primary.index:
                row = primary.loc[(domain, hypothesis)].to_dict()
                block.append({"domain": domain, "hypothesis": hypothesis, "family": family, "claim": claim} | row)
            else:
                reason = MISSING_REASONS.get(hypothesis, "no test rows")
                block.append({"domain": domain, "hypothesis": hypothesis, "family": family, "claim": claim,
                              "pvalue": math.nan, "note": f"not testable: {reason}"})
        block = pd.DataFrame(block)
        block["pvalue_holm"] = math.nan
        for family in ("primary", "secondary"):
            valid = (block["pvalue"].notna() & (block["family"] == family)).to_numpy()
            if valid.any():
                block.loc[valid, "pvalue_holm"] = holm(block.loc[valid, "pvalue"])
        for column in VERDICT_COLUMNS:
            if column not in block:
                block[column] = math.nan
        block["estimate_label"] = block["hypothesis"].map(ESTIMATE_LABELS).fillna("Spearman rho")
        outcome = [verdict(r, alpha) for _, r in block.iterrows()]
        block["verdict"] = [v for v, _ in outcome]
        block["reason"] = [r for _, r in outcome]
        rows.append(block[VERDICT_COLUMNS])
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=VERDICT_COLUMNS)
    table["n"] = table["n"].astype("Int64")
    return table


def survives(paper_conclusion: str, ours: str) -> str:
    """Whether a conclusion of the paper ('supported' / 'not supported') survives our verdict on the same data."""
    if paper_conclusion == "supported":
        if ours == "supported":
            return "yes"
        if ours == "not supported":
            return "no: ruled out"
        return f"no: not shown ({ours})"
    if ours == "not supported":
        return "yes: the effect of interest is ruled out"
    if ours == "supported":
        return "no: the effect is found"
    return f"partly: not significant here either, but {ours}, so no evidence of absence"


def summarise(values: pd.Series) -> str:
    """'k of n' significant per-task p-values (< 0.05), for published hypotheses without an average row."""
    values = values.dropna()
    return f"{int(np.sum(values < 0.05))} of {len(values)} tasks p < 0.05"
