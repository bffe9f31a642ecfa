import math

import pytest

from kd_utils.tasks import TASKS, accuracy_summary, build_prompt, extract_answer, is_correct, tasks_for, wilson_interval


def test_registry_has_the_papers_14_tasks_and_two_extras():
    core = [t.id for t in TASKS.values() if t.core]
    assert len(core) == 14 and {"mawps", "mathqa"} == set(TASKS) - set(core)
    assert [t.id for t in tasks_for("math")] == ["gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua"]
    with pytest.raises(KeyError, match="unknown task id 'nope'"):
        tasks_for(["gsm8k", "nope"])


@pytest.mark.parametrize("text, expected", [
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", 14.0),  # last number wins
    ("She pays 1,250 dollars", 1250.0),  # commas removed
    ("The temperature is -5 degrees", -5.0),
    ("It costs 3.75 in total", 3.75),
    ("The answer is 4.", 4.0),  # "4." parses as 4
    ("no number at all", math.inf),
    ("", math.inf),
])
def test_numeric_extraction(text, expected):
    assert extract_answer("gsm8k", text) == expected


def test_numeric_correctness_tolerance():
    assert is_correct("svamp", "The answer is 8", "8.0")
    assert is_correct("addsub", "so 0.3333", "0.33333")  # |diff| <= 0.001
    assert not is_correct("addsub", "so 0.33", "0.33333")
    assert not is_correct("gsm8k", "I do not know", "0")


def test_letter_extraction_takes_first_capital_a_to_e():
    assert extract_answer("aqua", "The answer is (C).") == "C"  # 'T' is not A-E; first hit is C
    assert extract_answer("aqua", "A: the answer is (D)") == "A"  # the paper's crude rule: first A-E anywhere
    assert extract_answer("aqua", "the answer is none") == ""
    assert is_correct("aqua", " (B) 1000", "B")


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "True", ""),  # case-sensitive, as in LLM-Adapters
    ("boolq", "that is untrue, so false", "true"),  # substring match inside another word, as in the paper
    ("piqa", "solution2 is better than solution1", "solution2"),  # first label found
    ("siqa", "the correct answer is answer3", "answer3"),
    ("winogrande", "Option1 or option2", "option2"),
    ("arc_c", "the correct answer is answer5", "answer5"),
    ("hellaswag", "ending4", "ending4"),
    ("obqa", "no idea", ""),
])
def test_label_extraction(task, text, expected):
    assert extract_answer(task, text) == expected


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4901625, abs=1e-6) and high == pytest.approx(0.9433178, abs=1e-6)
    low, high = wilson_interval(0, 4)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.4898908, abs=1e-6)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    summary = accuracy_summary(8, 10)
    assert summary["accuracy"] == 80.0 and summary["ci_low"] == pytest.approx(49.01625, abs=1e-4)


@pytest.mark.parametrize("n", [1, 6, 7, 100])
def test_accuracy_lies_inside_its_interval(n):
    """Exactly, also at 0% and 100% (error bars are accuracy - ci_low and ci_high - accuracy)."""
    for correct in range(n + 1):
        s = accuracy_summary(correct, n)
        assert 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 100
    assert accuracy_summary(0, n)["ci_low"] == 0 and accuracy_summary(n, n)["ci_high"] == 100


def test_an_unknown_prompt_template_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError) as err:
        build_prompt("Add 2 and 3.", template="alpaca")
    assert str(err.value) == "unknown prompt template 'alpaca'; expected one of clean, paper_train, paper_eval"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # raised "from None": no KeyError chain


def test_prompt_template_with_and_without_input():
    assert build_prompt("Add 2 and 3.").endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    with_input = build_prompt("Add.", "2 and 3")
    assert "paired with an input" in with_input and "### Input:\n2 and 3\n\n### Response:\n" in with_input
