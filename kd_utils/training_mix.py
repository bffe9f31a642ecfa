"""Training mixes: each domain's training data, decontaminated against every test set.

Two mixes (``training.<role>.mix``): ``llm_adapters`` rebuilds the authors' data (LLM-Adapters' math_10k /
commonsense_15k, see :data:`COMMONSENSE_RECIPE`) as far as the public files allow; ``design`` is the older
project mix. Rationales come from the sources themselves (GSM8K's solutions, MAWPS's equations); the
upstream PIQA / Social IQa / WinoGrande train splits are written in the LLM-Adapters test files' templates.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

from kd_utils.constants import DEFAULT_MIX, MIXES
from kd_utils.data_files import (
    DataError,
    Example,
    data_file,
    load_all_tests,
    load_task,
    read_json,
    require_keys,
    task_file,
)
from kd_utils.decontamination import DecontaminationReport, TestIndex, decontaminate
from kd_utils.tasks import get_task

# The training mixes a run can use (training.<role>.mix): "llm_adapters" rebuilds the authors' data
# (LLM-Adapters' math_10k / commonsense_15k, see COMMONSENSE_RECIPE) as far as public files allow;
# "design" is the older project mix (commonsense: the boolq / ARC / OBQA train splits only).
TRAIN_SOURCES = {"math": ["gsm8k"], "commonsense": ["boolq", "arc_e", "arc_c", "obqa"]}  # the "design" mix
# LLM-Adapters' commonsense_170k is the eight commonsense train splits, each written in the instruction
# template and answer format of its test file; commonsense_15k (the authors' train_args / README) is a
# 15,000-row sample of it. Neither file nor the script that made them is public offline, so the recipe is
# rebuilt: each task's share of the 15k is its train split's share of the eight, i.e. a uniform sample.
# Sizes: the public train splits (WinoGrande: train_xl; HellaSwag: its 39,905-row train split, which the data
# directory lacks, so its share is missing from the mix: the mix holds the other seven tasks' recipe counts).
COMMONSENSE_RECIPE = {"boolq": 9427, "piqa": 16113, "siqa": 33410, "hellaswag": 39905, "winogrande": 40398,
                      "arc_e": 2251, "arc_c": 1119, "obqa": 4957}
COMMONSENSE_15K = 15000
MIX_SEED = 0  # the rebuilt mix is one fixed file, as the authors' was: the run seed only samples n_train from it
_TRAIN_FILES = {"gsm8k": "gsm8k/train.jsonl", "mawps": "llm-adapters/mawps/trainset.json",
                "piqa": "piqa/train.jsonl", "siqa": "siqa/train.jsonl", "winogrande": "winogrande/train_xl.jsonl"}
_LABEL_FILES = {"piqa": "piqa/train-labels.lst", "siqa": "siqa/train-labels.lst"}  # upstream: labels beside the items


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def training_source_file(source: str) -> str:
    """The file a training source (gsm8k, mawps, or a commonsense task's train split) is read from."""
    return _TRAIN_FILES.get(source) or task_file(source, "train")


def gsm8k_rationale(solution: str) -> tuple[str, str]:
    """GSM8K's "... <<48/2=24>>24 ... #### 72" -> ("... 24 ... The answer is 72.", "72")."""
    if "####" not in solution:
        raise DataError(f"GSM8K solution without '####' answer line: {solution[:60]!r}")
    steps, answer = solution.rsplit("####", 1)
    answer = answer.strip().replace(",", "")
    steps = re.sub(r"<<[^>]*>>", "", steps)
    steps = " ".join(line.strip() for line in steps.strip().splitlines() if line.strip())
    return f"{steps} The answer is {answer}.", answer


def mawps_rationale(equation: str, answer: float) -> str:
    """MAWPS "X=((22.0-14.0)/4.0)" -> "((22 - 14) / 4) = 2. The answer is 2."."""
    expr = equation.split("=", 1)[1] if "=" in equation else equation
    expr = re.sub(r"(\d+\.\d+|\d+)", lambda m: _format_number(float(m.group())), expr)
    expr = re.sub(r"\s*([-+*/])\s*", r" \1 ", expr).strip()
    value = _format_number(float(answer))
    return f"{expr} = {value}. The answer is {value}."


def load_training_source(source: str, data_dir: str | Path | None = None) -> list[Example]:
    """One training source as Examples with rationales: gsm8k, mawps, or a commonsense train split."""
    if source == "gsm8k":
        path = data_file(training_source_file(source), data_dir)
        examples = []
        for i, row in enumerate(read_json(path)):
            require_keys(row, ("question", "answer"), path, i)
            rationale, answer = gsm8k_rationale(row["answer"])
            examples.append(Example(f"gsm8k-train-{i}", "gsm8k", "math", row["question"], "", answer, rationale))
        return examples
    if source == "mawps":
        path = data_file(training_source_file(source), data_dir)
        examples = []
        for i, row in enumerate(read_json(path)):
            require_keys(row, ("original_text", "equation", "ans"), path, i)
            examples.append(Example(f"mawps-train-{i}", "mawps", "math", row["original_text"].strip(), "",
                                    _format_number(float(row["ans"])), mawps_rationale(row["equation"], row["ans"])))
        return examples
    if source in ("piqa", "siqa", "winogrande"):
        return _upstream_choice_source(source, data_dir)
    return load_task(source, "train", data_dir)


# The LLM-Adapters test files' templates (checked byte for byte against the PIQA and Social IQa dev splits,
# tests/test_data.py), applied to the upstream train splits.
def piqa_instruction(goal: str, sol1: str, sol2: str) -> str:
    return (f"Please choose the correct solution to the question: {goal}\n\nSolution1: {sol1}\n\n"
            f"Solution2: {sol2}\n\nAnswer format: solution1/solution2")


def siqa_instruction(context: str, question: str, a: str, b: str, c: str) -> str:
    return (f"Please choose the correct answer to the question: {context} {question}\n\nAnswer1: {a} "
            f"Answer2: {b} Answer3: {c}\n\nAnswer format: answer1/answer2/answer3")


def winogrande_instruction(sentence: str, option1: str, option2: str) -> str:
    return (f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}"
            f"\n\nOption1: {option1} Option2: {option2} Answer format: option1/option2")


def _upstream_choice_source(source: str, data_dir: str | Path | None) -> list[Example]:
    """PIQA / Social IQa / WinoGrande train in their upstream layouts, as LLM-Adapters-format Examples."""
    path = data_file(_TRAIN_FILES[source], data_dir)
    rows = read_json(path)
    if source in _LABEL_FILES:
        label_path = data_file(_LABEL_FILES[source], data_dir)
        labels = [line.strip() for line in label_path.read_text().splitlines() if line.strip()]
        if len(labels) != len(rows):
            raise DataError(f"{label_path} has {len(labels)} labels for the {len(rows)} items of {path}")
        rows = [{**row, "label": label} for row, label in zip(rows, labels)]
    keys = {"piqa": ("goal", "sol1", "sol2", "label"), "siqa": ("context", "question", "answerA", "answerB",
                                                               "answerC", "label"),
            "winogrande": ("sentence", "option1", "option2", "answer")}[source]
    examples = []
    for i, row in enumerate(rows):
        require_keys(row, keys, path, i)
        if source == "piqa":
            text, answer = piqa_instruction(row["goal"], row["sol1"], row["sol2"]), f"solution{int(row['label']) + 1}"
        elif source == "siqa":
            text = siqa_instruction(row["context"], row["question"], row["answerA"], row["answerB"], row["answerC"])
            answer = f"answer{int(row['label'])}"
        else:
            text = winogrande_instruction(row["sentence"], row["option1"], row["option2"])
            answer = f"option{row['answer']}"
        if answer not in get_task(source).labels:
            raise DataError(f"{path} record {i}: label {answer!r} is not one of {', '.join(get_task(source).labels)}")
        examples.append(Example(f"{source}-train-{i}", source, "commonsense", text, "", answer,
                                f"the correct answer is {answer}"))
    return examples


def _check_mix(mix: str) -> None:
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r} is not one of {', '.join(MIXES)}")


def training_sources(domain: str, include_mawps: bool = False, mix: str = DEFAULT_MIX) -> list[str]:
    """The training sources of a domain's mix (MAWPS optional, math only; math is the same under both mixes)."""
    if domain not in TRAIN_SOURCES:
        raise ValueError(f"unknown domain {domain!r}; expected one of {list(TRAIN_SOURCES)}")
    _check_mix(mix)
    if domain == "commonsense" and mix == "llm_adapters":
        return [t for t in COMMONSENSE_RECIPE if t != "hellaswag"]
    return TRAIN_SOURCES[domain] + (["mawps"] if include_mawps and domain == "math" else [])


def training_source_files(domain: str, include_mawps: bool = False, mix: str = DEFAULT_MIX) -> list[str]:
    """Every file a domain's mix reads (train items and, for PIQA / Social IQa, their label files)."""
    return [f for s in training_sources(domain, include_mawps, mix)
            for f in (training_source_file(s), _LABEL_FILES.get(s)) if f]


def mix_description(domain: str, mix: str = DEFAULT_MIX, include_mawps: bool = False) -> str:
    """One line saying what a domain's mix holds and how it differs from the authors' file."""
    _check_mix(mix)
    if domain == "math":
        sources = "GSM8K train" + (" + MAWPS train" if include_mawps else "")
        return (f"{sources}, decontaminated; the closest to LLM-Adapters' math_10k"
                + ("" if include_mawps else " with include_mawps") + ", which also holds 1,000 AQuA train items "
                "(not available) and ChatGPT rationales (ours: GSM8K's own, MAWPS's equations)")
    if mix == "design":
        return "boolq, ARC-e, ARC-c and OBQA train, every row, decontaminated (not the authors' data)"
    counts = recipe_counts()
    kept = {t: n for t, n in counts.items() if t != "hellaswag"}
    return (f"LLM-Adapters' commonsense_15k rebuilt: {sum(kept.values()):,} decontaminated rows of "
            + ", ".join(f"{t} {n:,}" for t, n in kept.items())
            + f" (uniform-sample shares); HellaSwag's {counts['hellaswag']:,} are missing (no train split)")


def recipe_counts(total: int = COMMONSENSE_15K) -> dict[str, int]:
    """Rows per task of a ``total``-row uniform sample of the eight train splits (largest remainders)."""
    size = sum(COMMONSENSE_RECIPE.values())
    exact = {t: total * n / size for t, n in COMMONSENSE_RECIPE.items()}
    counts = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: counts[t] - exact[t])[:total - sum(counts.values())]:
        counts[t] += 1
    return counts


def _recipe_mix(data_dir, index: TestIndex, total: int) -> tuple[list[Example], DecontaminationReport]:
    """commonsense_15k rebuilt: each available task's recipe count of decontaminated rows, fixed-seed.

    Rows are drawn in a fixed random order and checked as drawn, so a removed row is replaced by the next
    and only the rows drawn are checked (the build stays fast); a task with too few rows keeps all it has.
    """
    report, mix = DecontaminationReport(), []
    for task, count in recipe_counts(total).items():
        if task == "hellaswag":
            continue  # its train split is not available (COMMONSENSE_RECIPE)
        rows = load_training_source(task, data_dir)
        order = list(range(len(rows)))
        random.Random(f"{MIX_SEED}-{task}").shuffle(order)
        chosen = []
        for i in order:
            if len(chosen) == count:
                break
            record = index.hit(rows[i])
            if record is None:
                chosen.append(i)
            else:
                report.removed.append(record)
        mix += [rows[i] for i in sorted(chosen)]
    report.kept = len(mix)
    return mix, report


def build_training_mix(domain: str, data_dir: str | Path | None = None, include_mawps: bool = False,
                       decontaminate_against: dict[str, list[Example]] | None = None, mix: str = DEFAULT_MIX,
                       recipe_total: int = COMMONSENSE_15K) -> tuple[list[Example], DecontaminationReport]:
    """A domain's training mix, decontaminated against every test set.

    ``mix="llm_adapters"`` (default): math = GSM8K train (+ MAWPS with ``include_mawps``), the closest
    to LLM-Adapters' math_10k the public data allows (AQuA train is missing; rationales are GSM8K's human
    ones and MAWPS's equations, not math_10k's ChatGPT ones); commonsense = commonsense_15k rebuilt
    (``recipe_counts(recipe_total)``, HellaSwag's share missing). ``mix="design"``: the older mix
    (commonsense: boolq, ARC-e, ARC-c, OBQA train, all rows).
    """
    _check_mix(mix)
    tests = decontaminate_against if decontaminate_against is not None else load_all_tests(data_dir)
    if domain == "commonsense" and mix == "llm_adapters":
        return _recipe_mix(data_dir, TestIndex(tests), recipe_total)
    train = [ex for s in training_sources(domain, include_mawps, mix) for ex in load_training_source(s, data_dir)]
    return decontaminate(train, tests)


def mix_fingerprint(examples: list[Example]) -> str:
    """A content hash of a training mix (used in cache keys and run ids)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.instruction, ex.input, ex.rationale], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def source_counts(examples: list[Example]) -> dict[str, int]:
    return dict(Counter(ex.task for ex in examples))
