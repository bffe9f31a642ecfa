"""Task registry, the Alpaca prompt templates (ours and the authors'), answer extraction and scoring.

Extraction follows LLM-Adapters' evaluate.py / commonsense_evaluate.py, which the
paper's code uses unchanged:
- numeric tasks: commas removed, the last match of ``-?\\d+\\.?\\d*`` as a float,
  ``math.inf`` when there is none; correct when ``|pred - label| <= 0.001``;
- aqua / mathqa: the first of the capital letters A-E anywhere in the output;
- commonsense: the first label word found by a case-sensitive substring search
  (so "True" is not a label and "untrue" yields "true", exactly as in the paper).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from statistics import NormalDist

NUMERIC, LETTER, LABEL = "numeric", "letter", "label"


@dataclass(frozen=True)
class Task:
    id: str
    domain: str  # "math" | "commonsense"
    answer_kind: str  # NUMERIC | LETTER | LABEL
    data_name: str  # folder name under llm-adapters/
    labels: tuple[str, ...] = ()
    core: bool = True  # one of the paper's 14 tasks (mawps, mathqa are extras)


TASKS: dict[str, Task] = {
    t.id: t
    for t in [
        Task("gsm8k", "math", NUMERIC, "gsm8k"),
        Task("svamp", "math", NUMERIC, "SVAMP"),
        Task("multiarith", "math", NUMERIC, "MultiArith"),
        Task("singleeq", "math", NUMERIC, "SingleEq"),
        Task("addsub", "math", NUMERIC, "AddSub"),
        Task("aqua", "math", LETTER, "AQuA", ("A", "B", "C", "D", "E")),
        Task("mawps", "math", NUMERIC, "mawps", core=False),
        Task("mathqa", "math", LETTER, "mathqa", ("A", "B", "C", "D", "E"), core=False),
        Task("boolq", "commonsense", LABEL, "boolq", ("true", "false")),
        Task("piqa", "commonsense", LABEL, "piqa", ("solution1", "solution2")),
        Task("siqa", "commonsense", LABEL, "social_i_qa", tuple(f"answer{i}" for i in range(1, 6))),
        Task("hellaswag", "commonsense", LABEL, "hellaswag", tuple(f"ending{i}" for i in range(1, 5))),
        Task("winogrande", "commonsense", LABEL, "winogrande", ("option1", "option2")),
        Task("arc_e", "commonsense", LABEL, "ARC-Easy", tuple(f"answer{i}" for i in range(1, 6))),
        Task("arc_c", "commonsense", LABEL, "ARC-Challenge", tuple(f"answer{i}" for i in range(1, 6))),
        Task("obqa", "commonsense", LABEL, "openbookqa", tuple(f"answer{i}" for i in range(1, 6))),
    ]
}
DOMAINS = ("math", "commonsense")


def get_task(task_id: str) -> Task:
    try:
        return TASKS[task_id]
    except KeyError:
        raise KeyError(f"unknown task id {task_id!r}; known: {', '.join(TASKS)}") from None


def tasks_for(selection: str | list[str]) -> list[Task]:
    """Resolve "all", "core", a domain name, or a list of task ids."""
    if isinstance(selection, str):
        if selection == "all":
            return list(TASKS.values())
        if selection == "core":
            return [t for t in TASKS.values() if t.core]
        if selection in DOMAINS:
            return [t for t in TASKS.values() if t.domain == selection and t.core]
        selection = [selection]
    return [get_task(t) for t in selection]


_INDENT = " " * 16
# Our clean Alpaca template (the `improved` protocol): one string for training and evaluation.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The authors' strings byte for byte (KD_generalization, generative/): indented, with trailing spaces.
# finetune.py generate_prompt (training; the rationale follows the last indent directly):
PAPER_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
PAPER_TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
# evaluate.py and commonsense_evaluate.py generate_prompt (evaluation; identical in the two files):
PAPER_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
PAPER_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}"
)
# template id -> (with input, without input); kd_utils.protocols names these ids
PROMPT_TEMPLATES: dict[str, tuple[str, str]] = {
    "clean": (PROMPT_WITH_INPUT, PROMPT_NO_INPUT),
    "paper_train": (PAPER_TRAIN_WITH_INPUT, PAPER_TRAIN_NO_INPUT),
    "paper_eval": (PAPER_EVAL_WITH_INPUT, PAPER_EVAL_NO_INPUT),
}
RESPONSE_MARKER = "### Response:"


def build_prompt(instruction: str, input: str = "", template: str = "clean") -> str:
    """An Alpaca prompt in one of PROMPT_TEMPLATES; the response follows directly.

    "clean" is our template, not the authors' (theirs are "paper_train" and "paper_eval").
    """
    try:
        with_input, no_input = PROMPT_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; "
                         f"expected one of {', '.join(PROMPT_TEMPLATES)}") from None
    if input:
        return with_input.format(instruction=instruction, input=input)
    return no_input.format(instruction=instruction)


_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")


def extract_answer(task_id: str, text: str) -> float | str:
    """The paper's answer extraction: a float for numeric tasks, a letter or label word else."""
    task = get_task(task_id)
    if task.answer_kind == NUMERIC:
        numbers = _NUMBER.findall(text.replace(",", ""))
        return float(numbers[-1]) if numbers else math.inf
    if task.answer_kind == LETTER:
        found = _LETTER.findall(text.strip())
        return found[0] if found else ""
    found = re.findall("|".join(task.labels), text.strip())
    return found[0] if found else ""


def is_correct(task_id: str, text: str, answer: str | float) -> bool:
    """Whether a model output is right under the paper's protocol."""
    pred = extract_answer(task_id, text)
    if get_task(task_id).answer_kind == NUMERIC:
        return abs(float(answer) - pred) <= 0.001
    return pred == str(answer).strip()


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion, as fractions in [0, 1]."""
    if n == 0:
        return (math.nan, math.nan)
    # the closed form (what statsmodels' proportion_confint(method="wilson") computes; tested equal): importing
    # statsmodels and scipy.stats here cost every run's kernel seconds (benchmarks/run_overhead.py)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p, z2 = correct / n, z * z
    center, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low, high = center - half, center + half
    # the closed form leaves ~1e-15 rounding at 0 and n successes: keep p inside its interval
    return min(float(low), p), max(float(high), p)


def accuracy_summary(correct: int, n: int) -> dict[str, float]:
    """Accuracy and its 95% Wilson interval, in percent (the results.csv convention)."""
    low, high = wilson_interval(correct, n)
    acc = 100.0 * correct / n if n else math.nan
    return {"n": n, "correct": correct, "accuracy": acc, "ci_low": 100 * low, "ci_high": 100 * high}
