"""Per-example predictions of a study's runs: the JSONL files, an in-memory store over them, and their
compact export.

Predictions live at ``<runs_dir>/<run_id>/predictions/<task>.jsonl``, one JSON object per
line with keys id, task, prompt, output, prediction, answer, correct (``output`` is null where
nothing was generated: log-likelihood choice scoring). The compact export (``correctness.csv.gz``
beside results.csv: run_id, task, id, correct, prediction) holds what the analysis needs apart from
generated text, so a committed study can be re-analysed without its predictions.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils.io import write_atomic

PREDICTION_KEYS = ("id", "task", "prompt", "output", "prediction", "answer", "correct")
CORRECTNESS_FILE = "correctness.csv.gz"
CORRECTNESS_COLUMNS = ["run_id", "task", "id", "correct", "prediction"]


def predictions_path(runs_dir: str | Path, run_id: str, task: str) -> Path:
    """Where a run's predictions for a task are stored."""
    return Path(runs_dir) / str(run_id) / "predictions" / f"{task}.jsonl"


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Read a predictions JSONL file; bad JSON, missing keys or repeated ids are errors naming file and line.

    ``id`` is read as a string so that teacher and student files join regardless of
    how ids were written; ``correct`` must be a JSON boolean.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: invalid JSON ({err.msg})") from err
            missing = [k for k in PREDICTION_KEYS if k not in record]
            if missing:
                raise ValueError(f"{path}, line {line_no}: missing key(s) {', '.join(missing)}")
            if not isinstance(record["correct"], bool):
                raise ValueError(f"{path}, line {line_no}: 'correct' must be true or false, got {record['correct']!r}")
            records.append({k: record[k] for k in PREDICTION_KEYS} | {"id": str(record["id"])})
    df = pd.DataFrame(records, columns=list(PREDICTION_KEYS))
    dup = df["id"].duplicated()
    if dup.any():
        raise ValueError(f"{path}: id {df['id'][dup].iloc[0]!r} appears more than once")
    return df


class Predictions:
    """Per-example predictions by (run_id, task): read lazily from ``runs_dir`` (each file once),
    or given as ``tables`` in memory (the null simulation), in :func:`load_predictions`'s columns."""

    def __init__(self, runs_dir: str | Path | None = None,
                 tables: Mapping[tuple[str, str], pd.DataFrame] | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self._tables = dict(tables or {})
        self._indexes: dict[tuple[str, str], pd.Index] = {}
        self._distinct: dict[str, list[pd.Index]] = {}

    def get(self, run_id: str, task: str) -> pd.DataFrame | None:
        """The run's predictions on the task, or None when there are none."""
        key = (str(run_id), str(task))
        if key not in self._tables and self.runs_dir is not None:
            path = predictions_path(self.runs_dir, *key)
            self._tables[key] = load_predictions(path) if path.is_file() else None
        return self._tables.get(key)

    def aligned(self, run_ids: Sequence[str], task: str, column: str = "correct"
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, values examples x runs) of ``column`` on the examples every run has, in the first run's
        order; None if a run has no predictions for the task."""
        frames = [self.get(r, task) for r in run_ids]
        if any(f is None for f in frames):
            return None
        indexes = [self._index(str(r), str(task), f) for r, f in zip(run_ids, frames)]
        ids = indexes[0]
        for index in indexes[1:]:
            if not (index is ids or ids.equals(index)):
                ids = ids.intersection(index, sort=False)
        columns = []
        for frame, index in zip(frames, indexes):
            values = frame[column].to_numpy()
            same = index is ids or (len(index) == len(ids) and ids.equals(index))
            columns.append(values if same else values[index.get_indexer(ids)])
        return ids.to_numpy(), np.column_stack(columns) if columns else np.empty((len(ids), 0))

    def _index(self, run_id: str, task: str, frame: pd.DataFrame) -> pd.Index:
        """The frame's ids as an Index, one shared object per distinct id list of a task (so that
        aligning runs on the same examples is an identity check)."""
        key = (run_id, task)
        if key not in self._indexes:
            index = pd.Index(frame["id"])
            shared = self._distinct.setdefault(task, [])
            self._indexes[key] = next((other for other in shared if other.equals(index)), index)
            if self._indexes[key] is index:
                shared.append(index)
        return self._indexes[key]


def as_predictions(source: str | Path | Predictions | None) -> Predictions | None:
    """A Predictions store from a runs directory (None when it does not exist) or a store itself."""
    if source is None or isinstance(source, Predictions):
        return source
    return Predictions(source) if Path(source).is_dir() else None


def export_correctness(runs_dir: str | Path, run_ids: Sequence[str], path: str | Path) -> pd.DataFrame:
    """Write the compact per-example export of these runs' predictions (gzip CSV, byte-reproducible:
    no timestamp in the gzip header); returns its table. Runs without predictions are left out."""
    frames = []
    for run_id in dict.fromkeys(map(str, run_ids)):
        for file in sorted((Path(runs_dir) / run_id / "predictions").glob("*.jsonl")):
            frame = load_predictions(file)
            frames.append(frame.assign(run_id=run_id)[CORRECTNESS_COLUMNS])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CORRECTNESS_COLUMNS)
    write_atomic(path, gzip.compress(table.to_csv(index=False).encode("utf-8"), mtime=0))
    return table


def read_correctness(path: str | Path) -> Predictions:
    """A :class:`Predictions` store from :func:`export_correctness`'s file (prompt, output, answer are None).

    Only an empty field is a missing prediction; predictions that all read as numbers become floats, as
    the JSONL's numeric answers load.
    """
    path = Path(path)
    table = pd.read_csv(path, dtype={"run_id": str, "task": str, "id": str, "prediction": str},
                        keep_default_na=False, na_values=[""])
    missing = [c for c in CORRECTNESS_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    if table["correct"].dtype != bool:
        raise ValueError(f"{path}: 'correct' must be True or False in every row")
    numbers = pd.to_numeric(table["prediction"], errors="coerce")
    if numbers.notna().sum() == table["prediction"].notna().sum():
        table["prediction"] = numbers
    tables = {}
    for (run_id, task), part in table.groupby(["run_id", "task"], sort=False):
        frame = part.assign(prompt=None, output=None, answer=None)[list(PREDICTION_KEYS)].reset_index(drop=True)
        if frame["id"].duplicated().any():
            raise ValueError(f"{path}: run {run_id}, task {task}: id {frame['id'][frame['id'].duplicated()].iloc[0]!r} "
                             "appears more than once")
        tables[(run_id, task)] = frame
    return Predictions(tables=tables)
