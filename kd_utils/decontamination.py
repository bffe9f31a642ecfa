"""Decontamination: a training example is dropped when its question, normalised, equals a test question or
shares an n-gram (13 words) with one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from kd_utils.data_files import Example

_PROMPT_PREFIX = re.compile(r"^please (?:choose|answer) [^:]*:\s*", re.IGNORECASE)
_ANSWER_FORMAT = re.compile(r"\s*answer format:.*$", re.IGNORECASE | re.DOTALL)


def normalize_question(text: str) -> str:
    """Question text without the LLM-Adapters template, lower-cased, punctuation folded."""
    text = _ANSWER_FORMAT.sub("", _PROMPT_PREFIX.sub("", text.strip()))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class DecontaminationReport:
    """What decontamination removed: one row per removed training example."""
    removed: list[dict] = field(default_factory=list)
    kept: int = 0

    def summary(self) -> pd.DataFrame:
        """Counts of removed examples per (train source, test task, reason)."""
        if not self.removed:
            return pd.DataFrame(columns=["train_source", "test_task", "reason", "removed"])
        df = pd.DataFrame(self.removed)
        return df.groupby(["train_source", "test_task", "reason"]).size().rename("removed").reset_index()


class TestIndex:
    """Every test question (normalised) and its n-grams, to check training examples against."""

    def __init__(self, tests: dict[str, list[Example]], n: int = 13):
        self.n = n
        self.exact: dict[str, str] = {}
        self.grams: dict[tuple[str, ...], str] = {}
        for task_id, examples in tests.items():
            for ex in examples:
                q = normalize_question(ex.instruction + " " + ex.input)
                self.exact.setdefault(q, task_id)
                for g in ngrams(q, n):
                    self.grams.setdefault(g, task_id)

    def hit(self, ex: Example) -> dict | None:
        """The removal record of a contaminated example (equal question, or a shared n-gram), else None."""
        q = normalize_question(ex.instruction + " " + ex.input)
        hit, reason = self.exact.get(q), "exact"
        if hit is None:
            hit = next((self.grams[g] for g in ngrams(q, self.n) if g in self.grams), None)
            reason = f"{self.n}-gram"
        return None if hit is None else {"train_id": ex.id, "train_source": ex.task, "test_task": hit,
                                         "reason": reason}


def decontaminate(train: list[Example], tests: dict[str, list[Example]], n: int = 13
                  ) -> tuple[list[Example], DecontaminationReport]:
    """Drop training examples whose question equals a test question (normalised) or shares an n-gram."""
    index, report, kept = TestIndex(tests, n), DecontaminationReport(), []
    for ex in train:
        record = index.hit(ex)
        if record is None:
            kept.append(ex)
        else:
            report.removed.append(record)
    report.kept = len(kept)
    return kept, report
