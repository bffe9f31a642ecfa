"""run_training, launch_training, main, best_epoch and copy_dir: what the glue passes on and writes.

run_training's collaborators (loading, the mix, sampling, the teacher, the cache, train) are
replaced in the kd_utils.training namespace by recorders, so each test pins what run_training
hands to them and what it writes; one test runs the real chain on the tiny model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import accelerate
import pytest

from kd_utils import teachers, training
from kd_utils.data import DecontaminationReport, Example
from kd_utils.models import ModelError
from kd_utils.training import TrainConfig

MIX = [Example(f"g-{i}", "gsm8k", "math", f"question {i}", "", str(i)) for i in range(5)]
RATIONALES = [Example("r-0", "gsm8k", "math", "question 0", "", "0", "the teacher says 0")]
CACHED = [Example("c-0", "gsm8k", "math", "question 0", "", "0", "the cache says 0"),
          Example("c-1", "gsm8k", "math", "question 1", "", "1", "the cache says 1")]
REMOVED = [{"train_id": "x"}, {"train_id": "y"}]  # two examples dropped by decontamination
HISTORY = [{"epoch": 0, "step": 0, "val_loss": 2.0}, {"epoch": 1, "step": 3, "val_loss": 1.25}]


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.fixture()
def fakes(monkeypatch) -> SimpleNamespace:
    """Recorders for run_training's collaborators; models and tokenizers are the strings model:<name>, tok:<name>."""
    calls = SimpleNamespace(load=[], mix=[], sample=[], student=[], rationales=[], cached=[], identity=[], train=[])

    def load_model(name, adapter=None, dtype=None, device=None, merge_adapter=False):
        calls.load.append((name, adapter, merge_adapter, device))
        return f"model:{name}", f"tok:{name}"

    def build_training_mix(domain, data_dir=None, include_mawps=False, mix="llm_adapters"):
        calls.mix.append((domain, data_dir, include_mawps, mix))
        return list(MIX), DecontaminationReport(removed=list(REMOVED), kept=len(MIX))

    def sample_examples(examples, n, seed=0):
        calls.sample.append((examples, n, seed))
        return examples[:n]

    def build_student_dir(base, keep_layers, target):
        calls.student.append((base, keep_layers, target))
        return target

    def teacher_rationales(teacher, tokenizer, examples, max_new_tokens=256, batch_size=16, protocol="improved",
                           precision="fp32"):
        calls.rationales.append((teacher, tokenizer, examples, max_new_tokens, batch_size, protocol))
        return list(RATIONALES)

    def cached_rationales(path, examples, max_new_tokens, expect=None):
        calls.cached.append((path, examples, max_new_tokens, expect))
        return list(CACHED)

    def teacher_identity(teacher, teacher_adapter=None, task_aware_teacher=True):
        calls.identity.append((teacher, teacher_adapter, task_aware_teacher))
        return {"teacher": f"hash({teacher})", "adapter": f"hash({teacher_adapter})",
                "task_aware_teacher": task_aware_teacher}

    def train(model, tokenizer, train_examples, config, output_dir, *, teacher=None, val_examples=None,
              on_epoch_end=None):
        calls.train.append({"model": model, "tokenizer": tokenizer, "examples": train_examples, "config": config,
                            "output_dir": output_dir, "teacher": teacher_of(teacher), "val_examples": val_examples})
        # a Path is not JSON: the summary file must hold its text
        return {"history": HISTORY, "final_val_loss": 1.25, "kept_epoch": 1, "saved_to": Path(output_dir) / "adapter"}

    for name, fake in [("load_model", load_model), ("build_training_mix", build_training_mix),
                       ("sample_examples", sample_examples), ("build_student_dir", build_student_dir),
                       ("teacher_rationales", teacher_rationales), ("train", train),
                       ("default_device", lambda: "cuda:7")]:
        monkeypatch.setattr(training, name, fake)
    monkeypatch.setattr(training.cache_store, "cached_rationales", cached_rationales)
    monkeypatch.setattr(training.cache_store, "teacher_identity", teacher_identity)
    return calls


@pytest.fixture()
def adapter(tmp_path) -> str:
    path = tmp_path / "teacher-adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    return str(path)


def teacher_of(teacher) -> tuple | None:
    """What train was given as its teacher: ("online", model, tokenizer), ("cache", path, expect) or None."""
    if isinstance(teacher, teachers.OnlineTeacher):
        return "online", teacher.model, teacher.tokenizer
    if isinstance(teacher, teachers.CachedTeacher):
        return "cache", teacher.path, teacher.expect
    assert teacher is None
    return None


def only_train_call(fakes) -> dict:
    assert len(fakes.train) == 1
    return fakes.train[0]


# ---- run_training -----------------------------------------------------------------------------

def test_an_sft_run_trains_the_sampled_mix_and_writes_its_summary(fakes, tmp_path):
    out = tmp_path / "run"
    summary = training.run_training("base/m", str(out), n_train=3, data_dir="/data", seed=5, epochs=2,
                                    micro_batch_size=2, batch_size=4)
    # defaults: sft, the math mix without MAWPS, no teacher, no student built
    assert fakes.mix == [("math", "/data", False, "llm_adapters")]
    assert fakes.sample == [(MIX, 3, 5)]
    assert fakes.load == [("base/m", None, False, None)]
    assert fakes.student == fakes.rationales == fakes.cached == fakes.identity == []
    call = only_train_call(fakes)
    assert (call["model"], call["tokenizer"], call["output_dir"]) == ("model:base/m", "tok:base/m", out)
    assert call["examples"] == MIX[:3]
    assert call["config"] == TrainConfig(method="sft", seed=5, epochs=2, micro_batch_size=2, batch_size=4,
                                         n_train=3, protocol="improved")
    assert [call[k] for k in ("teacher", "val_examples")] == [None] * 2
    expected = {"base_model": "base/m", "method": "sft", "domain": "math", "protocol": "improved", "n_train": 3,
                "mix": "llm_adapters", "mix_sources": {"gsm8k": 5},  # the whole mix, before n_train samples it
                "decontamination_removed": 2, "history": HISTORY, "final_val_loss": 1.25, "kept_epoch": 1,
                "saved_to": str(out / "adapter")}
    assert {**summary, "saved_to": str(summary["saved_to"])} == expected
    text = (out / "train_summary.json").read_text()
    assert json.loads(text) == expected
    assert text.startswith('{\n "base_model": "base/m",\n "method": "sft",\n')  # indented one space per level


def test_the_domain_data_dir_and_mawps_reach_the_mix(fakes, tmp_path):
    summary = training.run_training("m", tmp_path / "run", domain="commonsense", data_dir=tmp_path / "d",
                                    include_mawps=True, protocol="paper", mix="design")
    assert fakes.mix == [("commonsense", tmp_path / "d", True, "design")]
    assert summary["mix"] == "design"
    assert fakes.sample == [(MIX, None, 0)]
    assert (summary["domain"], summary["protocol"]) == ("commonsense", "paper")
    assert only_train_call(fakes)["config"].protocol == "paper"


def test_a_layer_subset_student_is_built_next_to_the_run_and_trained(fakes, tmp_path):
    summary = training.run_training("/models/SmolLM-135M", tmp_path / "runs" / "r1", student_layers=2)
    target = tmp_path / "runs" / "student-SmolLM-135M-L2"
    assert fakes.student == [("/models/SmolLM-135M", 2, target)]
    assert fakes.load == [(str(target), None, False, None)]
    assert only_train_call(fakes)["model"] == f"model:{target}"
    assert summary["base_model"] == str(target)


def test_fkl_loads_the_task_aware_teacher_merged_on_the_training_device(fakes, tmp_path, adapter):
    training.run_training("m", tmp_path / "run", method="fkl", teacher="t", teacher_adapter=adapter, epochs=3)
    assert fakes.load == [("t", adapter, True, "cuda:7"), ("m", None, False, None)]  # the teacher first
    call = only_train_call(fakes)
    assert call["teacher"] == ("online", "model:t", "tok:t")
    assert (call["config"].method, call["config"].epochs) == ("fkl", 3)
    assert fakes.rationales == fakes.identity == []


def test_the_expertise_ablation_loads_the_bare_teacher_without_checking_the_adapter(fakes, tmp_path):
    training.run_training("m", tmp_path / "run", method="rkl", teacher="t", teacher_adapter=str(tmp_path / "absent"),
                          task_aware_teacher=False)
    assert fakes.load == [("t", None, True, "cuda:7"), ("m", None, False, None)]


def test_a_missing_teacher_adapter_fails_before_any_work(fakes, tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(ModelError, match=exact(f"adapter directory {absent} does not exist or has no "
                                               "adapter_config.json")):
        training.run_training("m", tmp_path / "run", method="gkd", teacher="t", teacher_adapter=str(absent))
    assert fakes.mix == fakes.load == fakes.train == []


def test_a_method_without_teacher_neither_loads_nor_checks_one(fakes, tmp_path):
    training.run_training("m", tmp_path / "run", method="sft", teacher="t", teacher_adapter=str(tmp_path / "absent"))
    assert fakes.load == [("m", None, False, None)]
    assert only_train_call(fakes)["teacher"] is None


def test_seqkd_trains_on_the_teachers_rationales_without_the_teacher(fakes, tmp_path, adapter):
    summary = training.run_training("m", tmp_path / "run", method="seqkd", teacher="t", teacher_adapter=adapter,
                                    n_train=2, micro_batch_size=2, batch_size=4, protocol="paper")
    assert fakes.load == [("t", adapter, True, "cuda:7"), ("m", None, False, None)]
    # default budget 128 tokens; generation batches of 4 micro batches
    assert fakes.rationales == [("model:t", "tok:t", MIX[:2], 128, 8, "paper")]
    assert fakes.cached == []
    call = only_train_call(fakes)
    assert call["examples"] == RATIONALES
    assert call["teacher"] is None
    assert summary["n_train"] == len(RATIONALES)


def test_seqkd_from_a_cache_reads_its_rationales_for_this_teacher_and_seed(fakes, tmp_path):
    absent = str(tmp_path / "absent")  # the cache stands in for the teacher: its adapter is not opened
    training.run_training("m", tmp_path / "run", method="seqkd", teacher="t", teacher_adapter=absent,
                          teacher_cache="cache-dir", seqkd_max_new_tokens=64, seed=3)
    expect = {"teacher": "hash(t)", "adapter": f"hash({absent})", "task_aware_teacher": True, "seed": 3}
    assert fakes.identity == [("t", absent, True)]
    assert fakes.cached == [("cache-dir", MIX, 64, expect)]
    assert fakes.load == [("m", None, False, None)] and fakes.rationales == []
    call = only_train_call(fakes)
    assert call["examples"] == CACHED
    # the rationales are the training set: train gets neither the teacher nor the cache
    assert call["teacher"] is None


def test_fkl_from_a_cache_expects_the_named_teacher(fakes, tmp_path):
    training.run_training("m", tmp_path / "run", method="fkl", teacher="t", teacher_adapter="a",
                          task_aware_teacher=False, teacher_cache="cache-dir")
    expect = {"teacher": "hash(t)", "adapter": "hash(a)", "task_aware_teacher": False, "seed": 0}
    assert fakes.identity == [("t", "a", False)]
    assert fakes.load == [("m", None, False, None)]
    call = only_train_call(fakes)
    assert call["teacher"] == ("cache", "cache-dir", expect)


def test_a_cache_without_a_named_teacher_expects_nothing_of_it(fakes, tmp_path):
    training.run_training("m", tmp_path / "run", method="rkl", teacher_cache="cache-dir")
    assert fakes.identity == []
    call = only_train_call(fakes)
    assert call["teacher"] == ("cache", "cache-dir", None)


@pytest.mark.parametrize("params, message", [
    ({"method": "gkd", "teacher": "t", "teacher_cache": "c"},
     "method 'gkd' cannot use teacher_cache: it serves fkl, rkl and seqkd "
     "(gkd's on-policy batches need the online teacher)"),
    ({"method": "sft", "teacher_cache": "c"}, "method 'sft' cannot use teacher_cache: it serves fkl, rkl and seqkd"),
    ({"method": "fkl"}, "method 'fkl' needs a teacher (or a teacher_cache)"),
    ({"method": "seqkd"}, "method 'seqkd' needs a teacher (or a teacher_cache)"),
    ({"method": "distill", "teacher": "t"}, "method: expected one of sft, fkl, rkl, gkd, seqkd, got 'distill'"),
    ({"teacher": "t", "epochs": 0}, "epochs: 0 must be >= 1"),
])
def test_bad_parameters_are_named_before_any_work(fakes, tmp_path, params, message):
    with pytest.raises(ValueError, match=exact(message)):
        training.run_training("m", tmp_path / "run", **params)
    assert fakes.mix == fakes.load == fakes.train == []


def test_the_real_chain_trains_the_tiny_model_on_the_fixture_mix(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    summary = training.run_training(str(tiny_model_dir), out, data_dir=data_dir, epochs=1, batch_size=2,
                                    micro_batch_size=2, max_length=160, lora=False, val_fraction=0.25)
    # the fixture's GSM8K train file: 9 questions, one a reworded test question (removed)
    assert {k: summary[k] for k in ("base_model", "method", "domain", "protocol", "n_train",
                                    "decontamination_removed", "kept_epoch", "saved_to")} == {
        "base_model": str(tiny_model_dir), "method": "sft", "domain": "math", "protocol": "improved", "n_train": 8,
        "decontamination_removed": 1, "kept_epoch": 1, "saved_to": str(out / "model")}
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert math.isfinite(summary["final_val_loss"]) and summary["history"][1]["train_loss"] > 0  # responses fit
    assert json.loads((out / "train_summary.json").read_text()) == summary
    assert (out / "model" / "config.json").is_file()


# ---- launch_training and main -----------------------------------------------------------------

@pytest.fixture()
def launches(monkeypatch) -> SimpleNamespace:
    """run_training and accelerate's notebook_launcher replaced by recorders; a launched run writes its summary."""
    seen = SimpleNamespace(runs=[], launches=[])

    def run_training(**params):
        seen.runs.append(params)
        Path(params["output_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(params["output_dir"]) / "train_summary.json").write_text(json.dumps({"written_by": params["model"]}))
        return {"returned_by": params["model"]}

    def notebook_launcher(function, args=(), num_processes=None, **kwargs):
        seen.launches.append(num_processes)
        function(*args)  # the main process; launch_training reads its summary back

    monkeypatch.setattr(training, "run_training", run_training)
    monkeypatch.setattr(accelerate, "notebook_launcher", notebook_launcher)
    return seen


def test_one_process_runs_training_in_the_kernel(launches, tmp_path):
    out = str(tmp_path / "run")
    assert training.launch_training(model="m", output_dir=out) == {"returned_by": "m"}  # default: one process
    assert training.launch_training(num_processes=1, model="n", output_dir=out) == {"returned_by": "n"}
    assert launches.runs == [{"model": "m", "output_dir": out}, {"model": "n", "output_dir": out}]
    assert launches.launches == []


@pytest.mark.parametrize("processes", [2, 4])
def test_several_processes_go_through_the_notebook_launcher(launches, tmp_path, processes):
    out = str(tmp_path / "run")
    result = training.launch_training(num_processes=processes, model="m", output_dir=out, method="fkl")
    assert launches.launches == [processes]
    assert launches.runs == [{"model": "m", "output_dir": out, "method": "fkl"}]
    assert result == {"written_by": "m"}  # read back from output_dir/train_summary.json


def test_main_runs_training_from_a_params_file(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(training, "run_training", lambda **params: seen.append(params) or {})
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"model": "m", "output_dir": "o", "method": "fkl", "teacher": "t"}))
    training.main([str(path), "--output-dir", "elsewhere"])
    assert seen == [{"model": "m", "output_dir": "elsewhere", "method": "fkl", "teacher": "t"}]


def test_main_names_its_command_in_usage_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(training, "run_training", lambda **params: pytest.fail("nothing to run"))
    absent = tmp_path / "absent.json"
    with pytest.raises(SystemExit) as stop:
        training.main([str(absent)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"python -m kd_utils.training: error: params file {absent} "
                                                        "does not exist")


# ---- best_epoch and copy_dir ------------------------------------------------------------------

def history(*losses: float) -> list[dict]:
    return [{"epoch": epoch, "val_loss": loss} for epoch, loss in enumerate(losses)]


@pytest.mark.parametrize("losses, best", [
    ((0.5, 1.0, 2.0), 1),  # epoch 0 (before training) is never kept, even when lowest
    ((3.0, 2.0, 1.0, 1.0), 2),  # ties: the earliest
    ((9.0, math.nan, math.inf, 5.0, -math.inf, 6.0), 3),  # nan and infinities are skipped
    ((1.0, math.nan, math.inf, math.nan), 3),  # none finite: the last epoch
])
def test_best_epoch(losses, best):
    assert training.best_epoch(history(*losses)) == best


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    source = tmp_path / "checkpoints" / "epoch-2" / "adapter"
    (source / "sub").mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    return source


def test_copy_dir_puts_a_copy_in_place(checkpoint, tmp_path):
    training.copy_dir(checkpoint, tmp_path / "adapter")
    assert tree(tmp_path / "adapter") == {"adapter_config.json": b'{"r": 8}', "sub/weights.bin": b"\x00\x01\x02"}
    assert tree(checkpoint) == tree(tmp_path / "adapter")  # the source is left as it was
    assert not (tmp_path / ".adapter.tmp").exists()


def test_copy_dir_replaces_a_target_and_a_stale_temp_dir(checkpoint, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.bin").write_bytes(b"old")
    (tmp_path / ".adapter.tmp").mkdir()  # left by a copy that was killed half way
    (tmp_path / ".adapter.tmp" / "half.bin").write_bytes(b"half")
    training.copy_dir(checkpoint, tmp_path / "adapter")
    assert tree(tmp_path / "adapter") == {"adapter_config.json": b'{"r": 8}', "sub/weights.bin": b"\x00\x01\x02"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints"]
