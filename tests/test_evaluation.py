import json
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest

from kd_utils import evaluation, models
from kd_utils.data import Example

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_sample_is_fixed_by_seed_and_keeps_order():
    examples = [Example(f"x-{i}", "gsm8k", "math", "q", "", "1") for i in range(50)]
    a = evaluation.sample_examples(examples, 10, seed=3)
    assert a == evaluation.sample_examples(examples, 10, seed=3) != evaluation.sample_examples(examples, 10, seed=4)
    assert [e.id for e in a] == sorted((e.id for e in a), key=lambda s: int(s[2:]))
    assert evaluation.sample_examples(examples, None) == examples


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir)
    prompts = ["Tom has 3 apples", "A box holds 12 pens and more", "x", "Lucy bakes 4 trays of 6 cookies each."]
    batched = evaluation.generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    single = [evaluation.generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_evaluate_tasks_writes_predictions_and_metrics(tiny_model_dir, data_dir, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    out = tmp_path / "eval"
    metrics = evaluation.evaluate_tasks(model, tok, ["gsm8k", "aqua", "boolq", "hellaswag"], n_per_task=2,
                                        data_dir=data_dir, output_dir=out, batch_size=2,
                                        max_new_tokens={"math": 8, "commonsense": 4})
    assert list(metrics["task"]) == ["gsm8k", "aqua", "boolq"] and "hellaswag" in metrics.attrs["skipped"]
    assert (metrics["n"] == 2).all()
    assert pd.read_csv(out / "metrics.csv")["task"].tolist() == ["gsm8k", "aqua", "boolq"]
    records = evaluation.read_predictions(out / "predictions" / "gsm8k.jsonl")
    assert set(records[0]) == {"id", "task", "prompt", "output", "prediction", "answer", "correct"}
    assert records[0]["prompt"].endswith("### Response:\n")
    assert metrics.loc[0, "correct"] == sum(r["correct"] for r in records)


def test_unknown_task_fails_before_writing(tiny_model_dir, data_dir, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(KeyError, match="unknown task id 'gsm9k'"):
        evaluation.evaluate_tasks(model, tok, ["gsm8k", "gsm9k"], data_dir=data_dir, output_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_evaluation_notebook_end_to_end(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "nb"
    pm.execute_notebook(str(NOTEBOOKS / "evaluate.ipynb"), str(tmp_path / "evaluate.ipynb"), parameters={
        "model": str(tiny_model_dir), "tasks": ["gsm8k", "boolq"], "n_per_task": 2, "batch_size": 2,
        "max_new_tokens_math": 6, "max_new_tokens_commonsense": 4, "data_dir": str(data_dir),
        "output_dir": str(out)}, progress_bar=False, kernel_name="python3")
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["task"].tolist() == ["gsm8k", "boolq"]
    assert (out / "figures" / "accuracy.png").is_file() and (out / "figures" / "accuracy.pdf").is_file()
    lines = (out / "predictions" / "boolq.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["task"] == "boolq"


def test_paper_samples_with_the_authors_evaluation_seed(data_dir, monkeypatch):
    """eval_args.json seeds evaluation with 6 whatever the run's seed; improved's greedy decoding takes the run's."""
    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, seed=0, **kwargs):
        seen.append((seed, kwargs["top_p"], kwargs["do_sample"]))
        return ["the correct answer is true"] * len(prompts)

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    for protocol in ("paper", "improved[do_sample=true]"):
        evaluation.evaluate_tasks(None, None, ["boolq"], n_per_task=2, data_dir=data_dir, seed=3, protocol=protocol)
    assert seen == [(6, 1.0, True), (3, 1.0, True)]
