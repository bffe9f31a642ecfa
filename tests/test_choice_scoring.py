"""Log-likelihood choice scoring: parsing the LLM-Adapters items, the harness's contexts, the batched
scores against a float64 reference, the metrics, and the check over the real test files."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_utils import choice_scoring as cs
from kd_utils import evaluation, models
from kd_utils.data import DataError, Example, load_task

# One record per task in the layout of the LLM-Adapters test files (quoted from them; hellaswag's is
# absent offline and follows LLM-Adapters' layout: "Ending1: ... Ending4: ...").
FIXTURES = {
    "boolq": ("Please answer the following question with true or false, question: is house tax and property tax "
              "are same?\n\nAnswer format: true/false", "true"),
    "piqa": ("Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer with bobby "
             "pin \n\nSolution2: finish, woodgrain with  bobby pin \n\nAnswer format: solution1/solution2",
             "solution2"),
    "siqa": ("Please choose the correct answer to the question: Tracy didn't go home that evening and resisted "
             "Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go home "
             "and see Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3", "answer3"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was "
                   "a much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: "
                   "Maria Answer format: option1/option2", "option2"),
    "arc_e": ("Please choose the correct answer to the question: Which piece of safety equipment is used to keep "
              "mold spores from entering the respiratory system?\n\nAnswer1: safety goggles Answer2: breathing mask "
              "Answer3: rubber gloves Answer4: lead apron\n\nAnswer format: answer1/answer2/answer3/answer4",
              "answer2"),
    "arc_c": ("Please choose the correct answer to the question: Which is a renewable resource?\n\nAnswer1: coal "
              "Answer2: oil Answer3: wind Answer4: natural gas Answer5: uranium\n\nAnswer format: "
              "answer1/answer2/answer3/answer4/answer5", "answer3"),
    "obqa": ("Please choose the correct answer to the question: There is most likely going to be fog around:\n\n"
             "Answer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert\n\nAnswer format: "
             "answer1/answer2/answer3/answer4", "answer1"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Removing ice from car: Then, the "
                  "man writes over the snow covering the window of a car. then\n\nEnding1: , the man adds wax to the "
                  "windshield. Ending2: , a person boards a ski lift. Ending3: , the man puts on a coat. Ending4: , "
                  "the man continues removing the snow on his car.\n\nAnswer format: "
                  "ending1/ending2/ending3/ending4", "ending4"),
}


def test_contexts_and_continuations_follow_the_harness():
    item = {t: cs.parse_item(t, *FIXTURES[t]) for t in FIXTURES}
    assert item["boolq"].contexts == ("Question: is house tax and property tax are same?\nAnswer:",) * 2
    assert item["boolq"].continuations == (" yes", " no") and item["boolq"].label == 0
    assert item["piqa"].continuations == (" replace drawer with bobby pin", " finish, woodgrain with  bobby pin")
    assert item["piqa"].contexts[0] == "Question: dresser\nAnswer:" and item["piqa"].label == 1
    assert item["siqa"].contexts[0].startswith("Q: Tracy didn't go home") and item["siqa"].contexts[0].endswith(
        "before this?\nA:")
    assert item["siqa"].continuations == (" make a new plan", " Go home and see Riley", " Find somewhere to go")
    assert item["siqa"].label == 2
    # winogrande: partial scoring, the option fills the blank in the context, the rest is the shared continuation
    assert item["winogrande"].contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                                           "Sarah was a much better surgeon than Maria so Maria")
    assert item["winogrande"].continuations == (" always got the easier cases.",) * 2
    assert item["winogrande"].label == 1
    assert item["arc_c"].continuations[-1] == " uranium" and len(item["arc_c"].contexts) == 5
    assert item["arc_e"].contexts[0].startswith("Question: Which piece") and item["arc_e"].label == 1
    assert item["obqa"].contexts[0] == "There is most likely going to be fog around:"
    assert item["hellaswag"].contexts[0].startswith("Removing ice from car: Then,")
    assert item["hellaswag"].continuations[3] == " , the man continues removing the snow on his car."
    assert item["piqa"].norm_lengths == (len("replace drawer with bobby pin"), len("finish, woodgrain with  bobby pin"))


@pytest.mark.parametrize("task, instruction, answer, message", [
    ("piqa", FIXTURES["piqa"][0].replace("Solution2: ", "Solution 2: "), "solution1", "Solution2:"),
    ("arc_e", FIXTURES["arc_e"][0], "answer5", "not one of the item's labels"),
    ("boolq", FIXTURES["boolq"][0].replace("\n\nAnswer format: true/false", ""), "true", "Answer format"),
    ("winogrande", FIXTURES["winogrande"][0].replace(" _ ", " "), "option1", "one blank"),
    ("obqa", FIXTURES["piqa"][0], "solution1", "does not start with"),
    ("gsm8k", "How many?", "3", "not a multiple-choice task"),
    ("siqa", FIXTURES["siqa"][0].replace("answer1/answer2/answer3", "answer2/answer1/answer3"), "answer1",
     "is not the first labels"),
])
def test_malformed_items_are_refused_with_the_reason(task, instruction, answer, message):
    with pytest.raises(cs.ChoiceParseError, match=message):
        cs.parse_item(task, instruction, answer)


def test_choose_acc_and_acc_norm():
    scores = np.array([-10.0, -12.0, -30.0])
    assert cs.choose(scores, (2, 8, 40)) == {"acc": 0, "acc_norm": 2}  # -0.75 per character wins acc_norm
    assert cs.choose(np.array([-3.0, -3.0]), (5, 5)) == {"acc": 0, "acc_norm": 0}  # ties: the first, as np.argmax


def _reference(model, tokenizer, requests) -> np.ndarray:
    """Float64 log-softmax over the full logits of each request alone (no padding, no batching)."""
    out = []
    for context, continuation in requests:
        ctx, cont = cs.encode_pair(tokenizer, context, continuation)
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].double()
        logp = F.log_softmax(logits, -1)
        out.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)))
    return np.array(out)


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    model, tokenizer = models.load_model(tiny_model_dir, dtype=torch.float64, device="cpu")
    return model.eval(), tokenizer


def test_batched_scores_equal_a_float64_reference(tiny64):
    model, tokenizer = tiny64
    items = [cs.parse_item(t, *FIXTURES[t]) for t in FIXTURES]
    requests = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    expected = _reference(model, tokenizer, requests)
    for batch_size in (1, 3, 64):  # padding, mixed lengths in a batch, one batch of everything
        got = cs.continuation_logprobs(model, tokenizer, requests, batch_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert np.all(expected < 0)


def test_encode_pair_moves_trailing_spaces_and_keeps_the_continuation(tiny64):
    _, tokenizer = tiny64
    ctx, cont = cs.encode_pair(tokenizer, "Question: which?\nAnswer: ", "yes")
    assert ctx + cont == tokenizer("Question: which?\nAnswer: yes")["input_ids"]
    assert ctx == tokenizer("Question: which?\nAnswer:")["input_ids"] and cont


def test_score_examples_records(tiny64):
    model, tokenizer = tiny64
    examples = [Example(f"{t}-0", t, "commonsense", inst, "", ans) for t, (inst, ans) in FIXTURES.items()]
    records = cs.score_examples(model, tokenizer, examples, batch_size=4, metric="acc")
    direct = cs.score_items(model, tokenizer, [cs.parse_item(e.task, e.instruction, e.answer) for e in examples])
    for ex, rec, ref in zip(examples, records, direct):
        assert rec["choice"] == rec["choice_acc"] == int(np.argmax(rec["scores"]))
        np.testing.assert_allclose(rec["scores"], ref["scores"], atol=1e-9)
        assert rec["correct"] == (rec["prediction"] == ex.answer) == rec["correct_acc"]
        assert rec["choice_acc_norm"] == int(np.argmax(np.array(rec["scores"]) / np.array(rec["lengths"])))
        assert rec["output"] is None and rec["scoring"] == "loglik" and rec["metric"] == "acc"
    norm = cs.score_examples(model, tokenizer, examples, batch_size=4, metric="acc_norm")
    assert [r["correct"] for r in norm] == [r["correct_acc_norm"] for r in records]
    with pytest.raises(ValueError, match="acc, acc_norm"):
        cs.score_examples(model, tokenizer, examples, metric="accuracy")


def test_every_real_test_item_parses():
    """Over the LLM-Adapters test files in ../shared/data: every item yields as many choices as its answer
    format names, its label in range, non-empty continuations; ARC has a few 3- and 5-choice items."""
    checked = 0
    for task in cs.CHOICE_TASKS:
        try:
            examples = load_task(task, "test")
        except DataError:
            continue  # hellaswag offline
        sizes = collections.Counter()
        for ex in examples:
            item = cs.parse_item(task, ex.instruction, ex.answer)
            n = ex.instruction.rsplit("Answer format:", 1)[1].count("/") + 1
            assert len(item.contexts) == len(item.continuations) == len(item.choice_texts) == n
            assert 0 <= item.label < n and item.labels[item.label] == ex.answer
            assert all(x.strip() for x in item.continuations)
            sizes[n] += 1
        assert sum(sizes.values()) == len(examples) > 0
        checked += 1
    if checked == 0:
        pytest.skip("no LLM-Adapters test files (../shared/data or KD_DATA_DIR) on this machine")


def _write_choice_data(root) -> None:
    """A data directory with the FIXTURES items (real layout) as each task's test file, three copies each."""
    from kd_utils.tasks import get_task

    for task, (instruction, answer) in FIXTURES.items():
        path = root / "llm-adapters" / get_task(task).data_name / "test.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"instruction": instruction, "input": "", "output": f"the correct answer is "
                                     f"{answer}", "answer": answer}] * 3))


def test_evaluate_tasks_with_loglik_scoring(tiny64, tmp_path):
    model, tokenizer = tiny64
    _write_choice_data(tmp_path / "data")
    out = tmp_path / "eval"
    metrics = evaluation.evaluate_tasks(model, tokenizer, ["piqa", "arc_c", "winogrande"], data_dir=tmp_path / "data",
                                        output_dir=out, batch_size=4, scoring="loglik", loglik_metric="acc")
    assert metrics["scoring"].tolist() == ["loglik"] * 3 and set(metrics["loglik_metric"]) == {"acc"}
    for row in metrics.to_dict("records"):
        records = evaluation.read_predictions(out / "predictions" / f"{row['task']}.jsonl")
        assert row["correct"] == sum(r["correct"] for r in records) and row["n"] == len(records) == 3
        assert row["accuracy_acc_norm"] == pytest.approx(100 * np.mean([r["correct_acc_norm"] for r in records]))
        assert all(len(r["scores"]) == len(r["lengths"]) and r["output"] is None for r in records)
    assert evaluation.read_predictions(out / "predictions" / "arc_c.jsonl")[0]["label"] == 2
    with pytest.raises(ValueError, match="scoring 'loglik' needs multiple-choice tasks"):
        evaluation.evaluate_tasks(model, tokenizer, ["piqa", "gsm8k"], data_dir=tmp_path / "data", scoring="loglik")
    with pytest.raises(ValueError, match="scoring must be one of generate, loglik"):
        evaluation.evaluate_tasks(model, tokenizer, ["piqa"], data_dir=tmp_path / "data", scoring="logprob")


def test_study_params_carry_loglik_scoring_to_the_eval_runs(tmp_path):
    import yaml

    from kd_utils import params, study

    base = {"study": "x", "domains": ["commonsense"], "models": {"students": [{"name": "s20", "layers": 20}]},
            "methods": ["sft"], "evaluation": {"tasks": ["piqa", "arc_e"]}}

    def load(content):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(content))
        return params.load_study(tmp_path / "s.yaml")

    plain = study.plan(load(base))
    scored = study.plan(load({**base, "evaluation": {**base["evaluation"], "scoring": "loglik"}}))
    evals = [r for r in scored if r.stage == "eval"]
    assert all(r.parameters["scoring"] == "loglik" and r.parameters["loglik_metric"] == "acc_norm" for r in evals)
    assert all("scoring" not in r.parameters for r in plain)  # the default keeps generate-scored run ids
    assert [r.id for r in plain if r.stage != "eval"] == [r.id for r in scored if r.stage != "eval"]
    for bad, message in (({"scoring": "loglik", "tasks": ["piqa", "gsm8k"]}, "evaluation.tasks also holds gsm8k"),
                         ({"scoring": "logprob"}, "evaluation.scoring: expected one of generate, loglik"),
                         ({"loglik_metric": "acc_mean"}, "evaluation.loglik_metric: expected one of acc, acc_norm")):
        with pytest.raises(params.ParamsError, match=message):
            load({**base, "evaluation": {**base["evaluation"], **bad}})
    import papermill

    declared = papermill.inspect_notebook(str(study.NOTEBOOKS / "evaluate.ipynb"))
    assert {"scoring", "loglik_metric"} <= set(declared)


def test_cost_model_counts_every_choice_request_once(tiny_model_dir, tmp_path):
    """A loglik eval run is one forward over the tokens of every (item, choice) request, nothing generated."""
    from types import SimpleNamespace

    from kd_utils import costs

    _write_choice_data(tmp_path / "data")
    tok = models.load_tokenizer(tiny_model_dir)
    run = SimpleNamespace(id="eval-x", parameters={"tasks": ["obqa", "siqa"], "n_per_task": 2, "seed": 0,
                                                   "data_dir": str(tmp_path / "data"), "batch_size": 4,
                                                   "scoring": "loglik"})
    expected = sum(2 * sum(map(len, cs.encode_pair(tok, c, x)))
                   for t in ("obqa", "siqa") for it in [cs.parse_item(t, *FIXTURES[t])]
                   for c, x in zip(it.contexts, it.continuations))
    (work,) = costs._eval_work(run, 1000, str(tiny_model_dir))
    assert (work.kind, work.tokens, work.batch) == ("forward", expected, 4)
