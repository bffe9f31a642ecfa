"""Scoring against known answers: fixed model outputs, hand-labelled verdicts, known counts.

Every verdict below is written out by hand from the paper's rule (LLM-Adapters' evaluate.py):
commas removed, the last number in the output, correct when |pred - label| <= 0.001 (an
absolute tolerance, whatever the size of the label).
"""

import json
import math
import re

import pandas as pd
import pytest
from scipy.stats import norm

from kd_utils import evaluation
from kd_utils.tasks import TASKS, accuracy_summary, build_prompt, get_task, is_correct, tasks_for, wilson_interval

# (label, model output, correct) for a numeric task
NUMERIC_CASES = [
    ("0", "The answer is 0.0009", True),
    ("0", "The answer is -0.0009", True),
    ("0", "The answer is 0.001", True),  # the boundary itself: |0.001 - 0| == 0.001 exactly in floats
    ("0", "The answer is 0.0011", False),
    ("0", "The answer is -0.0011", False),
    ("1", "so 1.0009", True),
    ("1", "so 0.9991", True),
    ("1", "so 1.0011", False),
    ("1", "so 0.9989", False),
    ("1000000", "It is 1000000.0009.", True),
    ("1000000", "It is 999999.9991.", True),
    ("1000000", "It is 1000000.0011.", False),  # a relative tolerance (1e-3 * label) would accept it
    ("1000000", "It is 999999.9989.", False),
    ("1000000", "They paid 1,000,000 dollars.", True),  # commas removed
    ("1000000", "They paid 1,000,000.0011 dollars.", False),
    ("1234.5", "First 2,000, then 1,234.5 in the end", True),  # the last number wins
    ("1234.5", "First 1,234.5, then 2,000 in the end", False),
    ("-5", "The temperature fell to -5 degrees.", True),
    ("-5", "The temperature fell by 5 degrees.", False),
    ("5", "The change is -5.", False),
    ("-0.5", "x = -0.5", True),
    ("0", "I do not know.", False),  # no number: never correct, not even for label 0
    ("7.0", "", False),
    ("7.0", "Seven, so 7", True),  # labels come as "7.0" in the data files
]

LETTER_CASES = [  # aqua: the first of A-E anywhere in the output
    ("B", "(B) 1000", True),
    ("B", "Answer: (B)", False),  # the 'A' of 'Answer' comes first
    ("C", "A: the answer is (C)", False),
    ("D", "the answer is none", False),
    ("E", " E", True),
]
LABEL_CASES = [  # boolq: the first label word, case-sensitive substring search
    ("false", "the correct answer is false", True),
    ("true", "True", False),
    ("true", "that is untrue, so false", True),
    ("false", "false or true", True),
    ("true", "false or true", False),
    ("false", "no idea", False),
]


@pytest.mark.parametrize("task, label, output, correct", [
    *(("gsm8k", *case) for case in NUMERIC_CASES), *(("aqua", *case) for case in LETTER_CASES),
    *(("boolq", *case) for case in LABEL_CASES)])
def test_verdicts(task, label, output, correct):
    assert is_correct(task, output, label) is correct
    if task == "gsm8k":
        assert is_correct("svamp", output, float(label)) is correct  # a float label gives the same verdict


def write_test_file(root, task_id: str, cases) -> None:
    path = root / "llm-adapters" / get_task(task_id).data_name / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": f"item {i}: what is it?", "input": "", "output": "",
                                 "answer": label} for i, (label, _, _) in enumerate(cases)]))


def test_evaluation_of_fixed_outputs_gives_known_counts(tmp_path, monkeypatch):
    """evaluate_tasks end to end (data files, sampling, scoring, metrics, predictions) with the
    model's generations replaced by fixed outputs."""
    cases = {"gsm8k": NUMERIC_CASES, "aqua": LETTER_CASES, "boolq": LABEL_CASES}
    for task_id, rows in cases.items():
        write_test_file(tmp_path / "data", task_id, rows)

    def fixed_outputs(model, tokenizer, prompts, *args, **kwargs):
        task = kwargs.get("desc")
        return [cases[task][int(re.search(r"item (\d+):", p).group(1))][1] for p in prompts]

    monkeypatch.setattr(evaluation, "generate", fixed_outputs)
    metrics = evaluation.evaluate_tasks(None, None, list(cases), data_dir=tmp_path / "data",
                                        output_dir=tmp_path / "eval")
    got = {row.task: (row.n, row.correct) for row in metrics.itertuples()}
    assert got == {"gsm8k": (24, 12), "aqua": (5, 2), "boolq": (6, 3)}
    for row in metrics.itertuples():  # accuracy and the Wilson interval from their formulas
        p, n, z = row.correct / row.n, row.n, norm.ppf(0.975)
        center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
        assert row.accuracy == pytest.approx(100 * p, abs=1e-12)
        assert row.ci_low == pytest.approx(100 * (center - half), abs=1e-9)
        assert row.ci_high == pytest.approx(100 * (center + half), abs=1e-9)
    records = evaluation.read_predictions(tmp_path / "eval" / "predictions" / "gsm8k.jsonl")
    assert [r["correct"] for r in records] == [c for _, _, c in NUMERIC_CASES]
    assert [r["prediction"] for r in records][:3] == [0.0009, -0.0009, 0.001]
    assert records[21]["prediction"] is None and records[22]["prediction"] is None  # no number
    assert records[13]["prediction"] == 1000000.0


# ---- the rest of the task registry's public behaviour


def test_task_selection_by_keyword_domain_and_single_id():
    assert [t.id for t in tasks_for("all")] == list(TASKS)
    core = [t.id for t in tasks_for("core")]
    assert len(core) == 14 and "mawps" not in core and "mathqa" not in core
    assert [t.id for t in tasks_for("commonsense")] == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e",
                                                        "arc_c", "obqa"]
    assert [t.id for t in tasks_for("svamp")] == ["svamp"]
    assert [t.id for t in tasks_for(["aqua", "boolq"])] == ["aqua", "boolq"]
    with pytest.raises(KeyError, match=r"unknown task id 'ALL'; known: gsm8k, svamp, multiarith"):
        tasks_for("ALL")


def test_prompt_with_input_holds_the_instruction():
    assert build_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert build_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")


def test_wilson_interval_at_another_confidence():
    # z = 1.6449: (0.8 + z^2/20 -+ z sqrt(0.016 + z^2/400)) / (1 + z^2/10)
    low, high = wilson_interval(8, 10, confidence=0.9)
    assert low == pytest.approx(0.5407928, abs=1e-6) and high == pytest.approx(0.9314420, abs=1e-6)


def test_wilson_interval_is_statsmodels_wilson():
    from statsmodels.stats.proportion import proportion_confint

    for n in (1, 2, 7, 30, 150, 1000):
        for correct in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for confidence in (0.9, 0.95, 0.99):
                low, high = proportion_confint(correct, n, alpha=1 - confidence, method="wilson")
                assert wilson_interval(correct, n, confidence) == pytest.approx((low, high), abs=1e-12)


def test_accuracy_summary_keys_and_empty_task():
    assert accuracy_summary(3, 4) == pytest.approx(
        {"n": 4, "correct": 3, "accuracy": 75.0, "ci_low": 100 * wilson_interval(3, 4)[0],
         "ci_high": 100 * wilson_interval(3, 4)[1]})
    empty = accuracy_summary(0, 0)
    assert empty["n"] == 0 and empty["correct"] == 0
    assert all(math.isnan(empty[k]) for k in ("accuracy", "ci_low", "ci_high"))


# ---- the evaluation notebook on a model whose outputs are known

SCRIPTED_ANSWER = "The answer is 7. true"  # what the scripted model says to every prompt
NOTEBOOK_CASES = {  # (label, correct for SCRIPTED_ANSWER)
    "gsm8k": [("7", True), ("7.0009", True), ("7.0011", False), ("15", False)],
    "boolq": [("true", True), ("false", False), ("true", True)],
}


@pytest.mark.slow
def test_evaluate_notebook_scores_a_model_with_known_outputs(tiny_model_dir, tmp_path):
    """evaluate.ipynb's metrics, predictions and displayed table against values computed here:
    the model's greedy outputs (plain transformers, one prompt at a time), and verdicts chosen
    with the answers."""
    import papermill as pm
    import torch
    from known_outputs import scripted_model_dir
    from test_evaluation import NOTEBOOKS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = scripted_model_dir(tiny_model_dir, tmp_path / "scripted", SCRIPTED_ANSWER, "### Response:\n")
    for task_id, rows in NOTEBOOK_CASES.items():
        write_test_file(tmp_path / "data", task_id, [(label, None, None) for label, _ in rows])
    out = tmp_path / "eval"
    executed = pm.execute_notebook(
        str(NOTEBOOKS / "evaluate.ipynb"), str(tmp_path / "evaluate.ipynb"), progress_bar=False, kernel_name="python3",
        parameters={"model": str(model_dir), "tasks": list(NOTEBOOK_CASES), "n_per_task": None, "batch_size": 2,
                    "max_new_tokens_math": 12, "max_new_tokens_commonsense": 12, "data_dir": str(tmp_path / "data"),
                    "output_dir": str(out)})

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    for task_id, rows in NOTEBOOK_CASES.items():
        records = evaluation.read_predictions(out / "predictions" / f"{task_id}.jsonl")
        assert [r["answer"] for r in records] == [label for label, _ in rows]
        assert [r["correct"] for r in records] == [correct for _, correct in rows]
        for i, record in enumerate(records):
            assert record["prompt"].endswith(f"### Instruction:\nitem {i}: what is it?\n\n### Response:\n")
            enc = tokenizer(record["prompt"], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            own = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            assert own == record["output"] == SCRIPTED_ANSWER

    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics[["task", "n", "correct"]].values.tolist() == [["gsm8k", 4, 2], ["boolq", 3, 2]]
    assert metrics["accuracy"].tolist() == pytest.approx([50.0, 200 / 3])
    table = next(o["data"]["text/plain"] for c in executed.cells if "".join(c.source).strip() == "metrics.round(2)"
                 for o in c.get("outputs", []) if "data" in o)
    first_block = table.split("\n\n")[0]  # a wide table wraps its later columns into further blocks
    shown = [line.split()[1:6] for line in first_block.splitlines()[1:]]
    assert shown == [["gsm8k", "math", "4", "2", "50.00"], ["boolq", "commonsense", "3", "2", "66.67"]]
