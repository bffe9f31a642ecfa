import json
import math
import os
from functools import partial

import pytest
import torch

from kd_utils import batches, models, objectives, teachers, training
from kd_utils.data import Example
from kd_utils.training import TrainConfig


@pytest.fixture(scope="module")
def mix():
    facts = [("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7. The answer is 7."),
             ("A box has 12 pens and 5 are taken. How many pens are left?", "12 - 5 = 7. The answer is 7."),
             ("6 birds sit and 9 more arrive. How many birds?", "6 + 9 = 15. The answer is 15."),
             ("Mike reads 10 pages a day for 3 days. How many pages?", "10 * 3 = 30. The answer is 30.")]
    return [Example(f"m-{i}", "gsm8k", "math", q, "", a.split()[-1].rstrip("."), a) for i, (q, a) in
            enumerate(facts * 5)]


def tiny_config(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, micro_batch_size=2, lr=3e-3, max_length=96, val_fraction=0.2, seed=0,
                lora=False, gkd_max_new_tokens=8, loss_chunk_size=64)
    return TrainConfig(**{**base, **overrides})


def test_finetune_lowers_validation_loss_and_resumes_identically(tiny_model_dir, mix, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    full = training.train(model, tok, mix, tiny_config(epochs=3), tmp_path / "full")
    history = full["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert (tmp_path / "full" / "model" / "config.json").is_file()

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Killed()

    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(Killed):
        training.train(model, tok, mix, tiny_config(epochs=3), tmp_path / "resumed",
                       on_epoch_end=kill_after_first_epoch)
    assert not (tmp_path / "resumed" / "model").exists()
    model, tok = models.load_model(tiny_model_dir)
    resumed = training.train(model, tok, mix, tiny_config(epochs=3), tmp_path / "resumed")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    assert resumed["history"][-1]["train_loss"] == pytest.approx(history[-1]["train_loss"], rel=1e-6)


def test_same_seed_gives_identical_losses(tiny_model_dir, mix, tmp_path):
    runs = []
    for name in ("a", "b"):
        model, tok = models.load_model(tiny_model_dir)
        runs.append(training.train(model, tok, mix, tiny_config(epochs=1, lora=True, lora_r=4), tmp_path / name))
    assert runs[0]["history"] == runs[1]["history"]
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("method", ["fkl", "rkl", "gkd"])
def test_distillation_trains_without_nan_and_kd_loss_decreases(tiny_model_dir, mix, tmp_path, method):
    teacher, tok = models.load_model(tiny_model_dir)
    training.train(teacher, tok, mix, tiny_config(epochs=2), tmp_path / "teacher")
    teacher, _ = models.load_model(tmp_path / "teacher" / "model")
    student, _ = models.load_model(models.build_student_dir(tiny_model_dir, 1, tmp_path / "student-base"))
    config = tiny_config(method=method, epochs=3, temperature=2.0, noise_sigma=0.5 if method == "fkl" else 0.0)
    result = training.train(student, tok, mix, config, tmp_path / method, teacher=teachers.OnlineTeacher(teacher, tok))
    kd = [h["kd_loss"] for h in result["history"][1:]]
    assert all(torch.isfinite(torch.tensor(kd))) and kd[-1] < kd[0]


def test_seqkd_uses_teacher_generations(tiny_model_dir, mix):
    teacher, tok = models.load_model(tiny_model_dir)
    rewritten = teachers.teacher_rationales(teacher, tok, mix[:3], max_new_tokens=5, batch_size=2)
    assert [e.id for e in rewritten] == [e.id for e in mix[:3]] and all(e.rationale is not None for e in rewritten)


@pytest.mark.parametrize("field, value, message", [
    ("method", "kd", "method: expected one of"),
    ("temperature", 0.0, "temperature: 0.0 must be > 0"),
    ("noise_sigma", -1.0, "noise_sigma: -1.0 must be >= 0"),
    ("lmbda", 1.5, "lmbda: 1.5 must be in"),
    ("beta", -0.1, "beta: -0.1 must be in"),
])
def test_bad_config_fails_before_training(tiny_model_dir, mix, tmp_path, field, value, message):
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(ValueError, match=message):
        training.train(model, tok, mix, tiny_config(**{field: value}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_mismatch_is_refused(tiny_model_dir, tiny_corpus, mix, tmp_path):
    other = models.tiny_llama_dir(tmp_path / "other", [t[::-1] for t in tiny_corpus], vocab_size=300)
    teacher, teacher_tok = models.load_model(other)
    student, tok = models.load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="tokenizers differ"):
        training.train(student, tok, mix, tiny_config(method="fkl"), tmp_path / "out",
                       teacher=teachers.OnlineTeacher(teacher, teacher_tok))
    assert not (tmp_path / "out").exists()


def test_prompt_tokens_are_masked_from_the_labels_under_improved(tiny_model_dir, mix):
    tok = models.load_tokenizer(tiny_model_dir)
    row = batches.tokenize_example(tok, mix[0], 256)
    n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt and row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tok.eos_token_id
    batch = batches.collate([row, batches.tokenize_example(tok, mix[1], 20)], tok.pad_token_id)
    real = objectives.distill_mask(batch, TrainConfig(method="fkl", distill_positions="next_token"))
    response = objectives.distill_mask(batch, TrainConfig(method="fkl", distill_positions="response"))
    assert real.sum() > response.sum() > 0 and not (response & ~real).any()
    # the authors' positions: the attention mask itself, one more (the last real position) per row
    paper = objectives.distill_mask(batch, TrainConfig(method="fkl", distill_positions="paper"))
    assert torch.equal(paper, batch["attention_mask"].bool()) and paper.sum() == real.sum() + 2


@pytest.mark.slow
def test_finetune_then_distill_notebooks(tiny_model_dir, data_dir, tmp_path):
    from pathlib import Path

    import papermill as pm

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    common = {"model": str(tiny_model_dir), "data_dir": str(data_dir), "epochs": 1, "batch_size": 2,
              "micro_batch_size": 2, "max_length": 96, "lora_r": 4, "val_fraction": 0.25}
    pm.execute_notebook(str(notebooks / "finetune.ipynb"), str(tmp_path / "ft.ipynb"), progress_bar=False,
                        parameters={**common, "output_dir": str(tmp_path / "teacher")})
    assert (tmp_path / "teacher" / "adapter" / "adapter_config.json").is_file()
    pm.execute_notebook(str(notebooks / "distill.ipynb"), str(tmp_path / "kd.ipynb"), progress_bar=False,
                        parameters={**common, "output_dir": str(tmp_path / "student"), "method": "rkl",
                                    "student_layers": 1, "teacher": str(tiny_model_dir),
                                    "teacher_adapter": str(tmp_path / "teacher" / "adapter"), "temperature": 2.0})
    summary = json.loads((tmp_path / "student" / "train_summary.json").read_text())
    assert summary["method"] == "rkl" and summary["base_model"].endswith("student-tiny-L1")
    assert (tmp_path / "student" / "figures" / "losses.png").is_file()
    # values recomputed from the inputs: the fixture's 9 GSM8K rows less 1 planted duplicate, 2 held out,
    # 6 / 2 = 3 steps
    from known_outputs import check_training_notebook

    for executed, run, base in (("ft.ipynb", "teacher", tiny_model_dir),
                                ("kd.ipynb", "student", summary["base_model"])):
        checked = check_training_notebook(tmp_path / executed, tmp_path / run, base, data_dir, 0.25, 96)
        assert checked["n_train"] == 8 and [h["step"] for h in checked["history"]] == [0, 3]


@pytest.mark.slow
def test_script_entry_point_runs_a_study_runs_params_file(tiny_model_dir, data_dir, tmp_path):
    """The entry point ``accelerate launch -m kd_utils.training`` uses, here as one CPU process."""
    import subprocess
    import sys

    resolved = {"model": str(tiny_model_dir), "data_dir": str(data_dir), "method": "sft", "epochs": 1,
                "batch_size": 2, "micro_batch_size": 2, "max_length": 64, "lora": False, "val_fraction": 0.25,
                "n_train": 8, "output_dir": str(tmp_path / "unused")}
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"run": {"stage": "student"}, "resolved": resolved}))
    done = subprocess.run([sys.executable, "-m", "kd_utils.training", str(params),
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["n_train"] == 8
    assert not (tmp_path / "unused").exists()
    missing = subprocess.run([sys.executable, "-m", "kd_utils.training", str(tmp_path / "nope.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.json does not exist" in missing.stderr


def test_validation_loss_skips_batches_without_labelled_tokens(tiny_model_dir, mix):
    model, tok = models.load_model(tiny_model_dir)
    rows = [batches.tokenize_example(tok, e, 96) for e in mix[:2]]
    cut = [{**r, "labels": [-100] * len(r["labels"])} for r in rows]  # prompts cut before their response
    loss = partial(training.validation_loss, model, micro_batch_size=2, pad_id=tok.pad_token_id, device="cpu")
    assert not math.isnan(loss(rows))
    assert loss(cut + rows) == pytest.approx(loss(rows), rel=1e-6)
    assert math.isnan(loss(cut)) and math.isnan(loss([]))  # nothing to score


def test_two_processes_keep_the_effective_batch_and_the_schedule(tiny_model_dir, data_dir, tmp_path):
    """``accelerate launch --cpu --num_processes 2 -m kd_utils.training`` (torchrun here), fkl from a teacher
    cache: the same optimizer steps and learning rates per epoch as one process."""
    import subprocess
    import sys

    from kd_utils import teacher_cache

    common = dict(max_length=64, val_fraction=0.0, seed=0, temperature=2.0)  # 8 rows: 2 batches of 4
    cache = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "cache", data_dir=str(data_dir),
                                            temperatures=(2.0,), epochs=2, **{k: v for k, v in common.items()
                                                                    if k != "temperature"})["caches"][2.0, 0.0]
    resolved = {"model": str(tiny_model_dir), "teacher": str(tiny_model_dir), "student_layers": 1,
                "data_dir": str(data_dir), "method": "fkl", "teacher_cache": cache, "epochs": 2, "batch_size": 4,
                "micro_batch_size": 2, "lr": 1e-3, "lora": False, **common}
    def launch(processes: int, name: str, **overrides) -> subprocess.CompletedProcess:
        params = tmp_path / f"{name}.json"
        params.write_text(json.dumps({"resolved": {**resolved, "output_dir": str(tmp_path / name), **overrides}}))
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), "-m", "kd_utils.training", str(params)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})

    histories = {}
    for processes in (1, 2):
        done = launch(processes, f"out-{processes}")
        assert done.returncode == 0, done.stderr[-3000:]
        histories[processes] = json.loads((tmp_path / f"out-{processes}" / "history.json").read_text())
    one, two = histories[1], histories[2]
    assert [h["step"] for h in two] == [h["step"] for h in one] == [0, 2, 4]
    # linear decay without warmup: half the rate after the first of two epochs, 0 at the end
    for history in (one, two):
        assert history[1]["lr"] == pytest.approx(0.5e-3) and history[2]["lr"] == 0
    bad = launch(2, "bad", batch_size=2)
    assert bad.returncode != 0
    assert "batch_size=2 must be a multiple of micro_batch_size x processes = 2 x 2" in bad.stderr
    assert not (tmp_path / "bad").exists()
