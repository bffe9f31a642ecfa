"""Results I/O: the study's results.csv schema, its validation, model sizes, and the shared ids.

Both modes go through one long table in the study's ``results.csv`` schema (one row
per model run and task): :func:`load_results` reads and validates ours, and
:func:`kd_utils.statistics.paper.load_paper_results` converts the paper's CSVs into it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils.constants import KD_METHODS, PAPER_METHOD_NAMES, RESULTS_COLUMNS, STUDENT_METHODS

ROLES = ("teacher", "student", "base")
BASE_TEACHER_SUFFIX = ":base"
EXPERT, TASK_UNAWARE = "task expert", "task-unaware"

_NUMERIC_RESULTS_COLUMNS = ("temperature", "noise_sigma", "seed", "n", "correct", "ci_low", "ci_high")

_DOMAIN_ORDER = ("math", "commonsense")
_TASK_ORDER = (
    "gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua", "mawps", "mathqa",
    "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "average",
)
_METHOD_ORDER = ("all",) + STUDENT_METHODS
_ORDERS = {"domain": _DOMAIN_ORDER, "task": _TASK_ORDER, "method": _METHOD_ORDER}


def method_label(method: str) -> str:
    """Display name of a method id with the paper's name next to it, e.g. 'fkl (SeqKD)'."""
    if method == "all":
        return "all (pooled)"
    return f"{method} ({PAPER_METHOD_NAMES[method]})" if method in PAPER_METHOD_NAMES else method


def sort_rows(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Stable sort with the study's canonical order for domains, tasks and methods."""

    def key(s: pd.Series) -> pd.Series:
        order = _ORDERS.get(s.name)
        if order is None:
            return s
        rank = {v: i for i, v in enumerate(order)}
        return s.map(lambda v: f"{rank.get(v, len(order)):03d}:{v}")

    return df.sort_values(list(columns), key=key, kind="stable").reset_index(drop=True)


def coerce_numeric(df: pd.DataFrame, columns: Iterable[str], source: str, required: Iterable[str] = ()) -> pd.DataFrame:
    """Convert columns to floats; a non-numeric (or missing required) value is an error naming column and row."""
    df = df.copy()
    required = set(required)
    for col in columns:
        raw = df[col]
        num = pd.to_numeric(raw, errors="coerce")
        blank = raw.isna() | (raw.astype(str).str.strip() == "")
        bad = num.isna() & (~blank | (col in required))
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw.iloc[pos]
            what = "is missing" if blank.iloc[pos] else f"has non-numeric value {value!r}"
            raise ValueError(
                f"{source}: column {col!r} {what} in row {pos + 1} (file line {pos + 2})"
            )
        df[col] = num.astype(float)
    return df


def parse_model_size(name: str) -> float:
    """Parameters in billions from the last '<number>B' or '<number>M' in a model name; NaN if none.

    'Qwen2.5-0.5B' -> 0.5, 'Llama-3.2-1B' -> 1.0, 'smollm2-135m-instruct' -> 0.135.
    """
    matches = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", str(name), flags=re.IGNORECASE)
    if not matches:
        return math.nan
    number, unit = matches[-1]
    return float(number) / (1000.0 if unit.lower() == "m" else 1.0)


def load_model_sizes(path: str | Path) -> dict[str, float]:
    """Read the runner's models.csv (columns model, n_params = raw parameter count) as model -> billions."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("model", "n_params") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is missing required column(s): {', '.join(missing)}")
    df = coerce_numeric(df, ["n_params"], str(path), required=["n_params"])
    return {str(m): p / 1e9 for m, p in zip(df["model"], df["n_params"])}


def validate_results(df: pd.DataFrame, source: str = "results") -> pd.DataFrame:
    """Check a results table against the study schema and return it with numeric columns as floats.

    Errors name the column and the (1-based) row: missing columns, non-numeric or
    missing accuracies, non-numeric optional numbers, missing ids or KD teachers,
    unknown roles or student methods, and duplicate (run_id, task) rows.
    """
    missing = [c for c in RESULTS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source} is missing required column(s): {', '.join(missing)}")
    df = coerce_numeric(df, ["accuracy"], source, required=["accuracy"])
    df = coerce_numeric(df, _NUMERIC_RESULTS_COLUMNS, source)
    kd_rows = (df["role"] == "student") & df["method"].isin(KD_METHODS)
    for col, rows in [(c, True) for c in ("run_id", "role", "model", "task", "domain")] + [("teacher", kd_rows)]:
        blank = rows & (df[col].isna() | (df[col].astype(str).str.strip() == ""))
        if blank.any():
            pos = int(np.flatnonzero(blank.to_numpy())[0])
            raise ValueError(f"{source}: column {col!r} is missing in row {pos + 1} (file line {pos + 2})")
    for col, allowed, mask in (
        ("role", ROLES, pd.Series(True, index=df.index)),
        ("method", STUDENT_METHODS, df["role"] == "student"),
    ):
        bad = mask & ~df[col].isin(allowed)
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: column {col!r} has unknown value {df[col].iloc[pos]!r} in row {pos + 1} "
                f"(file line {pos + 2}); expected one of {', '.join(allowed)}"
            )
    dup = df.duplicated(["run_id", "task"])
    if dup.any():
        pos = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(
            f"{source}: duplicate (run_id, task) = ({df['run_id'].iloc[pos]!r}, {df['task'].iloc[pos]!r}) "
            f"in row {pos + 1} (file line {pos + 2})"
        )
    df["noise_sigma"] = df["noise_sigma"].fillna(0.0)
    return df


def load_results(path: str | Path) -> pd.DataFrame:
    """Read and validate a study's results.csv (see :func:`validate_results`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    # no NA parsing: 'n/a' is reported as the non-number it is, empty cells are missing
    return validate_results(pd.read_csv(path, dtype=str, keep_default_na=False), str(path))
