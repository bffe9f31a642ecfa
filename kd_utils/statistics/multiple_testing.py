"""Multiple testing: Holm's step-down adjustment, of a list of p-values and within families of a test table."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same values as statsmodels' multipletests(method="holm")).

    Computed here because statsmodels runs gc.collect() on every Holm call (~0.1 s),
    and a report adjusts dozens of families.
    """
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def holm_adjust(tests: pd.DataFrame, family: Sequence[str] = ("domain", "hypothesis", "method"),
                pvalue: str = "pvalue") -> pd.DataFrame:
    """Add ``pvalue_holm``: Holm's step-down adjustment within each family (default: across tasks).

    The family includes the ``average`` row (Holm is valid under any dependence, so
    this only makes it more conservative); rows without a p-value stay NaN and do not
    count towards the family size.
    """
    out = tests.copy()
    out["pvalue_holm"] = math.nan
    for _, group in out.groupby(list(family), dropna=False):
        valid = group[pvalue].notna()
        if valid.any():
            idx = group.index[valid.to_numpy()]
            out.loc[idx, "pvalue_holm"] = holm(group.loc[idx, pvalue])
    return out
