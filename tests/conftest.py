"""Shared fixtures: a tiny data directory in the real file formats, tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kd_utils import models
from kd_utils.precision import AUTO_ENV

# precision auto means fp32 in the tests (their kernels inherit it too): tests that pin numbers stay exact on
# any CPU; the bf16 tests ask for bf16 themselves
os.environ[AUTO_ENV] = "fp32"
from kd_utils.tasks import TASKS

MATH_QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", 7),
    ("A box holds 12 pens. Sara gives away 5 pens. How many pens are left in the box?", 7),
    ("There are 6 birds on a tree and 9 more arrive. How many birds are on the tree?", 15),
    ("Mike reads 10 pages a day for 3 days. How many pages does he read in total?", 30),
    ("A farmer has 20 cows and sells 8 of them at the market. How many cows remain?", 12),
    ("Lucy bakes 4 trays of 6 cookies each. How many cookies does she bake?", 24),
]
CHOICE_Q = ("Please choose the correct answer to the question: Which object is the largest?\n\n"
            "Answer1: an ant Answer2: a house Answer3: a coin Answer4: a pencil\n\n"
            "Answer format: answer1/answer2/answer3/answer4")


def write_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def make_data_dir(root: Path) -> Path:
    """Every file the data layer reads, a few records each, in the upstream formats."""
    adapters = root / "llm-adapters"
    for task in TASKS.values():
        if task.id == "hellaswag":
            continue  # absent offline, as in ../shared/data
        if task.answer_kind == "numeric":
            rows = [{"instruction": q, "input": "", "output": f"\nA: ... The answer is {a}.", "answer": f"{a}.0"}
                    for q, a in MATH_QUESTIONS[:4]]
        elif task.answer_kind == "letter":
            rows = [{"instruction": "What is 2 + 2? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7",
                     "input": "", "output": "The answer is B.", "answer": "B"}] * 3
        else:
            label = task.labels[0]
            rows = [{"instruction": CHOICE_Q.replace("largest", f"largest number {i}"), "input": "",
                     "output": f"the correct answer is {label}", "answer": label} for i in range(3)]
        write_json(adapters / task.data_name / "test.json", rows)
    write_json(adapters / "boolq" / "train.json", [
        {"instruction": f"Please answer the following question with true or false, question: is thing {i} small?"
                        "\n\nAnswer format: true/false", "input": "",
         "output": f"the correct answer is {'true' if i % 2 else 'false'}", "answer": "true" if i % 2 else "false"}
        for i in range(4)])
    for name in ("ARC-Easy", "ARC-Challenge", "openbookqa"):
        write_json(adapters / name / "train.json", [
            {"instruction": CHOICE_Q.replace("largest", f"smallest thing {i}").replace("pencil", f"{name} {i}"),
             "input": "",
             "output": "the correct answer is answer1", "answer": "answer1"} for i in range(4)])
    # PIQA / Social IQa / WinoGrande train in their upstream layouts (labels beside the items for the first two)
    piqa = [{"goal": f"How do I fix thing {i}?", "sol1": f"Use glue {i}", "sol2": f"Use water {i}"} for i in range(8)]
    # planted: a goal sharing 13 words with a commonsense test question
    piqa[3]["goal"] = "Which object is the largest number 1? Answer1: an ant Answer2: a house Answer3: a coin"
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    (root / "piqa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    (root / "piqa" / "train-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(8)))
    (root / "siqa").mkdir(parents=True, exist_ok=True)
    (root / "siqa" / "train.jsonl").write_text("".join(json.dumps(
        {"context": f"Kim met friend {i}.", "question": "How would Kim feel?", "answerA": "happy", "answerB": "sad",
         "answerC": f"bored {i}"}) + "\n" for i in range(8)))
    (root / "siqa" / "train-labels.lst").write_text("".join(f"{i % 3 + 1}\n" for i in range(8)))
    (root / "winogrande").mkdir(parents=True, exist_ok=True)
    (root / "winogrande" / "train_xl.jsonl").write_text("".join(json.dumps(
        {"sentence": f"Ann gave Bo the book {i} because _ was done.", "option1": "Ann", "option2": "Bo",
         "answer": str(i % 2 + 1)}) + "\n" for i in range(8)))
    write_json(adapters / "mawps" / "trainset.json", [
        {"id": 1, "original_text": "Ann has 2.0 cats and gets 3.0 more . How many cats does Ann have ?",
         "equation": "X=(2.0+3.0)", "ans": 5.0},
        # planted: the same question as a MultiArith test item
        {"id": 2, "original_text": MATH_QUESTIONS[0][0], "equation": "X=(3.0+4.0)", "ans": 7.0},
    ])
    gsm = root / "gsm8k"
    gsm.mkdir(parents=True, exist_ok=True)
    train = [{"question": f"Pat has {i} marbles and finds {i + 2} more. How many marbles does Pat have?",
              "answer": f"Pat has {i}+{i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} marbles.\n#### {2 * i + 2}"}
             for i in range(1, 9)]
    # planted: a test question reworded only in punctuation / case
    train.append({"question": MATH_QUESTIONS[1][0].upper().replace("?", " ?"), "answer": "12-5=7\n#### 7"})
    (gsm / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (gsm / "test.jsonl").write_text(json.dumps({"question": MATH_QUESTIONS[2][0], "answer": "#### 15"}) + "\n")
    return root


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    from kd_utils.tasks import build_prompt

    texts = [build_prompt(q) + f"The answer is {a}." for q, a in MATH_QUESTIONS]
    texts += [build_prompt(CHOICE_Q) + "the correct answer is answer2"]
    return texts * 4


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus) -> Path:
    return models.tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny", tiny_corpus)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return models.embedded_model_dir()


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory, tiny_model_dir) -> Path:
    """params/smoke.yaml on the tiny model and fixture data (shared: the runner tests compare against it)."""
    import yaml

    root = tmp_path_factory.mktemp("smoke")
    content = yaml.safe_load((Path(__file__).resolve().parents[1] / "params" / "smoke.yaml").read_text())
    content["models"]["teacher"] = str(tiny_model_dir)
    content["data_dir"] = str(make_data_dir(root / "data"))
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


# The smoke study cut to one chain, teacher -> its evaluation, teacher -> fkl student -> its evaluation, then the
# analysis: the runner tests that run a study more than once (kill and resume, other executors, Slurm) use it.
MINI = {"study": "mini", "methods": ["fkl"], "teacher_cache": {"enabled": False}}
MINI_EVALUATION = {"tasks": ["gsm8k"], "eval_base": False}


def mini_content(smoke_params: Path) -> dict:
    import yaml

    content = {**yaml.safe_load(smoke_params.read_text()), **MINI}
    content["evaluation"] = {**content["evaluation"], **MINI_EVALUATION}
    return content


@pytest.fixture(scope="session")
def mini_params(smoke_params, tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("mini") / "mini.yaml"
    path.write_text(yaml.safe_dump(mini_content(smoke_params)))
    return path


@pytest.fixture(scope="session")
def mini_finished(mini_params, tmp_path_factory) -> Path:
    """The mini study run once with the local executor, the reference of the other executors: its directory."""
    from kd_utils import study

    out = tmp_path_factory.mktemp("out-mini")
    assert study.run_study(mini_params, output_root=out) == 0
    return out / "mini"


@pytest.fixture(scope="session")
def finished(smoke_params, tmp_path_factory) -> tuple[int, Path]:
    """The smoke study run once, uninterrupted, with the local executor: (exit code, study directory)."""
    from kd_utils import study

    out = tmp_path_factory.mktemp("out-local")
    code = study.run_study(smoke_params, output_root=out)
    return code, out / "smoke"


@pytest.fixture(scope="session")
def study_report(tmp_path_factory) -> tuple[Path, str]:
    """The analysis notebook on the synthetic study (study_fixtures.py), its runs given runner status files,
    rendered as a study's report: (report.html, its text). The report and analysis-notebook tests share this
    one execution; the analysis files are in ``analysis/`` beside the report."""
    import pandas as pd
    from study_fixtures import write_run_status, write_study

    from kd_utils import report

    root = tmp_path_factory.mktemp("report")
    results = write_study(root / "study")
    (root / "study" / "params.resolved.json").write_text(json.dumps(
        {"study": "synth", "description": "A synthetic study.", "domains": ["math", "commonsense"], "data_dir": None,
         "training": {"student": {"include_mawps": False}}}))
    for run_id in pd.read_csv(results)["run_id"].unique():
        write_run_status(root / "study" / "runs", run_id, "eval", [], 2.0)
    html_path = report.render_report(
        Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb", root / "study" / "report.html",
        {"results_source": "study", "results_path": str(results), "output_dir": str(root / "study" / "analysis"),
         "n_bootstrap": 200, "embeddings": False, "report_dir": str(root / "study")})
    return html_path, html_path.read_text()
