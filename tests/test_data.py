import functools
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import pytest

from kd_utils import data, data_files, training_mix
from kd_utils.tasks import TASKS, get_task, is_correct


def test_every_task_loads_from_its_real_format(data_dir):
    for task_id, task in TASKS.items():
        if task_id == "hellaswag":
            continue
        examples = data.load_task(task_id, data_dir=data_dir)
        assert examples and all(ex.task == task_id and ex.domain == task.domain for ex in examples)
        assert examples[0].id == f"{task_id}-test-0" and examples[0].answer
    assert data.load_task("multiarith", data_dir=data_dir)[0].answer == "7.0"


def test_hellaswag_absence_is_reported_not_a_crash(data_dir, monkeypatch):
    monkeypatch.setenv("KD_DATA_OFFLINE", "1")
    ok, missing = data.available_tasks(["gsm8k", "hellaswag"], data_dir)
    assert ok == ["gsm8k"] and "hellaswag" in missing and "hellaswag" in missing["hellaswag"]
    with pytest.raises(data.DataError, match="hellaswag is not available offline"):
        data.load_task("hellaswag", data_dir=data_dir)


def test_missing_and_malformed_files_name_the_file(data_dir):
    (data_dir / "llm-adapters" / "SVAMP" / "test.json").unlink()
    with pytest.raises(data.DataError, match=r"SVAMP/test\.json.*KD_DATA_DIR"):
        data.load_task("svamp", data_dir=data_dir)
    (data_dir / "llm-adapters" / "AddSub" / "test.json").write_text('[{"instruction": "x", ')
    with pytest.raises(data.DataError, match=r"malformed JSON in .*AddSub/test\.json"):
        data.load_task("addsub", data_dir=data_dir)
    (data_dir / "llm-adapters" / "piqa" / "test.json").write_text('[{"input": ""}]')
    with pytest.raises(data.DataError, match=r"piqa/test\.json record 0 lacks instruction, answer"):
        data.load_task("piqa", data_dir=data_dir)
    with pytest.raises(data.DataError, match="not a directory"):
        data.resolve_data_dir(data_dir / "nope")


def test_data_dir_resolution_order(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("KD_DATA_DIR", str(data_dir))
    assert data.resolve_data_dir() == data_dir
    assert data.resolve_data_dir(tmp_path) == tmp_path  # explicit argument wins


def test_gsm8k_rationale_rewrite():
    rationale, answer = data.gsm8k_rationale(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 1,072")
    assert rationale == "Natalia sold 48/2 = 24 clips in May. Altogether 48+24 = 72 clips. The answer is 1072."
    assert answer == "1072"
    assert data.mawps_rationale("X=((22.0-14.0)/4.0)", 2.0) == "((22 - 14) / 4) = 2. The answer is 2."


def test_decontamination_removes_planted_duplicates(data_dir):
    mix, report = data.build_training_mix("math", data_dir, include_mawps=True)
    ids = {ex.id for ex in mix}
    assert "mawps-train-1" not in ids and "mawps-train-0" in ids  # exact duplicate of a test question
    assert "gsm8k-train-8" not in ids  # same question up to case and punctuation
    assert len(mix) == 8 + 1 and report.kept == len(mix)
    summary = report.summary()
    assert set(summary["reason"]) == {"exact"} and summary["removed"].sum() == 2
    assert all(ex.rationale.endswith(f"The answer is {ex.answer}.") for ex in mix)


def test_decontamination_catches_13gram_overlap():
    test = [data.Example("t-0", "svamp", "math", "one two three four five six seven eight nine ten eleven twelve "
                         "thirteen fourteen", "", "1")]
    near = data.Example("tr-0", "gsm8k", "math", "Zero one two three four five six seven eight nine ten eleven "
                        "twelve thirteen and more", "", "1", "r")
    far = data.Example("tr-1", "gsm8k", "math", "one two three four five six seven eight nine ten eleven twelve",
                       "", "1", "r")  # only 12 shared words
    kept, report = data.decontaminate([near, far], {"svamp": test})
    assert [ex.id for ex in kept] == ["tr-1"] and report.removed[0]["reason"] == "13-gram"


def test_commonsense_mix_strips_templates_before_matching(data_dir):
    mix, report = data.build_training_mix("commonsense", data_dir, mix="design")
    assert len(mix) == 16 and not report.removed  # the shared prompt template alone is not contamination
    assert {ex.task for ex in mix} == {"boolq", "arc_e", "arc_c", "obqa"}


# LLM-Adapters' test-file templates, one per task (what every training row of that task must look like)
TEMPLATES = {
    "boolq": r"Please answer the following question with true or false, question: .+\n\nAnswer format: true/false",
    "piqa": r"Please choose the correct solution to the question: .*\n\nSolution1: .*\n\nSolution2: .*\n\n"
            r"Answer format: solution1/solution2",
    "siqa": r"Please choose the correct answer to the question: .*\n\nAnswer1: .* Answer2: .* Answer3: .*\n\n"
            r"Answer format: answer1/answer2/answer3",
    "winogrande": r"Please choose the correct answer to fill in the blank to complete the given sentence: .*_.*\n\n"
                  r"Option1: .* Option2: .* Answer format: option1/option2",
    **{t: r"Please choose the correct answer to the question: .*\n\nAnswer1: .*\n\nAnswer format: "
          r"answer1/answer2/answer3/answer4(/answer5)?" for t in ("arc_e", "arc_c", "obqa")},
}


def check_recipe_mix(mix: list, total: int) -> None:
    """Every task but HellaSwag at its share of a uniform ``total``-row sample of the eight train splits
    (LLM-Adapters' commonsense_15k from commonsense_170k), each row in its test file's format."""
    sizes = data.COMMONSENSE_RECIPE
    counts = data.source_counts(mix)
    assert set(counts) == {t for t, n in data.recipe_counts(total).items() if n and t != "hellaswag"}
    for task, n in counts.items():
        assert abs(n - total * sizes[task] / sum(sizes.values())) < 1, task
    assert sum(counts.values()) + data.recipe_counts(total)["hellaswag"] == total
    for ex in mix:
        assert re.fullmatch(TEMPLATES[ex.task], ex.instruction, re.DOTALL), ex.id
        assert ex.answer in get_task(ex.task).labels and ex.rationale == f"the correct answer is {ex.answer}"
        assert is_correct(ex.task, ex.rationale, ex.answer)


def test_commonsense_mix_follows_the_llm_adapters_recipe(data_dir):
    mix, report = data.build_training_mix("commonsense", data_dir, recipe_total=20)
    check_recipe_mix(mix, 20)
    again, _ = data.build_training_mix("commonsense", data_dir, recipe_total=20)
    assert data.mix_fingerprint(again) == data.mix_fingerprint(mix)  # one fixed mix, whatever the run seed
    piqa = {ex.id: ex for ex in data.load_training_source("piqa", data_dir)}
    assert piqa["piqa-train-1"].answer == "solution2" and "Solution1: Use glue 1" in piqa["piqa-train-1"].instruction
    assert data.load_training_source("siqa", data_dir)[2].answer == "answer3"
    assert data.load_training_source("winogrande", data_dir)[0].answer == "option1"
    assert "siqa/train-labels.lst" in data.training_source_files("commonsense")
    assert "piqa" not in data.training_sources("commonsense", mix="design")
    with pytest.raises(ValueError, match="mix='15k' is not one of llm_adapters, design"):
        data.build_training_mix("commonsense", data_dir, mix="15k")


def test_a_contaminated_row_of_the_recipe_is_replaced_by_the_next(data_dir, monkeypatch):
    # a recipe of 7 PIQA rows out of 8: the planted goal (13 words shared with a test question) is dropped
    # and the remaining seven fill the count
    monkeypatch.setattr(training_mix, "COMMONSENSE_RECIPE", {"piqa": 7, "hellaswag": 1})
    mix, report = data.build_training_mix("commonsense", data_dir, recipe_total=8)
    assert [r["train_id"] for r in report.removed] == ["piqa-train-3"] and report.removed[0]["reason"] == "13-gram"
    assert sorted(ex.id for ex in mix) == [f"piqa-train-{i}" for i in range(8) if i != 3]


def test_recipe_sources_name_their_files(data_dir):
    (data_dir / "siqa" / "train-labels.lst").write_text("1\n")
    with pytest.raises(data.DataError, match="train-labels.lst has 1 labels for the 8 items"):
        data.load_training_source("siqa", data_dir)
    (data_dir / "winogrande" / "train_xl.jsonl").unlink()
    with pytest.raises(data.DataError, match="winogrande/train_xl.jsonl. It has no automatic download"):
        data.load_training_source("winogrande", data_dir)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "siqa" / "dev.jsonl").is_file(), reason="needs ../shared/data")
def test_templates_reproduce_the_llm_adapters_test_files_from_the_upstream_dev_splits():
    """PIQA's and Social IQa's dev splits rendered with our templates are LLM-Adapters' test files, byte for byte."""
    def rows(name):
        return [json.loads(line) for line in (SHARED / name).read_text().splitlines()]

    piqa, siqa = (json.loads((SHARED / "llm-adapters" / d / "test.json").read_text()) for d in ("piqa", "social_i_qa"))
    assert [r["instruction"] for r in piqa] == [data.piqa_instruction(r["goal"], r["sol1"], r["sol2"])
                                                for r in rows("piqa/valid.jsonl")]
    assert [r["instruction"] for r in siqa] == [
        data.siqa_instruction(r["context"], r["question"], r["answerA"], r["answerB"], r["answerC"])
        for r in rows("siqa/dev.jsonl")]


@pytest.mark.skipif(not (SHARED / "winogrande" / "train_xl.jsonl").is_file(), reason="needs ../shared/data")
def test_the_real_commonsense_mix_has_the_recipe_counts():
    mix, report = data.build_training_mix("commonsense", SHARED)
    check_recipe_mix(mix, data.COMMONSENSE_15K)
    assert len(mix) == 10944 and {r["train_source"] for r in report.removed} <= set(data.COMMONSENSE_RECIPE)


@pytest.fixture()
def local_server(tmp_path):
    root = tmp_path / "mirror"
    (root / "llm-adapters" / "SVAMP").mkdir(parents=True)
    payload = json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "1"}]).encode()
    (root / "llm-adapters" / "SVAMP" / "test.json").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", payload
    server.shutdown()


def test_downloader_fetches_and_verifies_checksum(local_server, tmp_path):
    url, payload = local_server
    rel = "llm-adapters/SVAMP/test.json"
    good = {rel: (len(payload), hashlib.sha256(payload).hexdigest())}
    path = data.download_file(rel, tmp_path / "cache", mirror=url, manifest=good)
    assert path.read_bytes() == payload
    bad = {rel: (len(payload), "0" * 64)}
    with pytest.raises(data.DataError, match="checksum"):
        data.download_file(rel, tmp_path / "cache2", mirror=url, manifest=bad)
    assert not (tmp_path / "cache2" / rel).exists() and not list((tmp_path / "cache2").rglob("*.part"))
    with pytest.raises(data.DataError, match="could not download"):
        data.download_file("llm-adapters/AQuA/test.json", tmp_path / "cache3", mirror=url)


def test_cache_is_used_when_nothing_else_is_there(local_server, tmp_path, monkeypatch):
    url, payload = local_server
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kdcache"))
    monkeypatch.setenv("KD_DATA_MIRROR", url)
    monkeypatch.delenv("KD_DATA_DIR", raising=False)
    monkeypatch.setattr(data_files, "PROJECT_ROOT", tmp_path / "no-project")  # no ../shared/data beside it
    monkeypatch.setitem(data.MANIFEST, "llm-adapters/SVAMP/test.json",
                        (len(payload), hashlib.sha256(payload).hexdigest()))
    examples = data.load_task("svamp")
    assert len(examples) == 1 and (tmp_path / "kdcache" / "data" / "llm-adapters" / "SVAMP" / "test.json").is_file()


def test_tampered_download_of_the_right_size_is_refused(local_server, tmp_path):
    """The mirror serves other bytes of the same length: only the sha256 can tell."""
    url, payload = local_server
    rel = "llm-adapters/SVAMP/test.json"
    original = payload.replace(b'"1"', b'"2"')
    assert len(original) == len(payload) and original != payload
    manifest = {rel: (len(original), hashlib.sha256(original).hexdigest())}
    with pytest.raises(data.DataError, match="checksum"):
        data.download_file(rel, tmp_path / "cache", mirror=url, manifest=manifest)
    assert not (tmp_path / "cache" / rel).exists()


def test_shared_data_matches_the_manifest():
    root = data.PROJECT_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip("../shared/data is not beside the project")
    for rel, expected in data.MANIFEST.items():
        if expected is not None:
            content = (root / rel).read_bytes()
            assert (len(content), hashlib.sha256(content).hexdigest()) == expected, rel
