"""The training loop's bookkeeping pinned on tiny runs: the history (steps, learning rates, loss means),
what is written where (checkpoints, the kept epoch, history.json), which arguments reach the teacher
source, the cache, tokenization and accelerate, and the errors raised before any work.

Collaborators are wrapped by recorders that call the real function (or, for the validation loss,
return scripted values so that the best epoch is known in advance); every expected value is
computed here by hand from the documented rules, the epoch means from the micro-batch losses the
recorder saw.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_training import mix  # noqa: F401 (the training tests' 20 examples, a fixture)

from kd_utils import checkpoints, models, seeds, teachers, training
from kd_utils.training import TrainConfig

CPU = torch.device("cpu")
SCRIPTED_VAL = [3.0, 1.0, 2.0]  # epochs 0, 1, 2: epoch 1 is the best, epoch 2 the last


class Stop(Exception):
    """Raised by a recorder once it has seen what the test needs: the rest of train is not run."""


class Killed(Exception):
    pass


def kill(epoch: int) -> None:
    raise Killed()


def exactly(message: str) -> str:
    """A pytest.raises match for the whole message."""
    return "^" + re.escape(message) + "$"


class FakeCacheSource:
    """Stands in for a teacher cache: dense random teacher logits, and a record of each targets() call."""

    def __init__(self, vocab: int):
        self.vocab, self.calls = vocab, []
        self.generator = torch.Generator().manual_seed(7)

    def targets(self, batch: dict, device, epoch: int) -> torch.Tensor:
        self.calls.append((device, epoch))
        b, t = batch["input_ids"].shape
        return 3 * torch.randn(b, t, self.vocab, generator=self.generator)

    def state(self) -> dict:
        return {"calls": len(self.calls)}


class Recorders:
    """Wraps train's collaborators in kd_utils.training for the duration of a run."""

    def __init__(self, patch: pytest.MonkeyPatch, scripted_val: list[float] | None = None):
        self.losses: list[tuple[float, float, float]] = []  # (loss, ce, kd) of each micro-batch
        self.batches: list[dict] = []
        self.val_calls: list[tuple[list[dict], object]] = []  # (rows, device)
        self.to_device: list[object] = []
        self.on_policy: list[tuple[int, object]] = []  # (micro-batch index, device)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[dict] = []
        real_loss, real_val, real_to_device = training.training_loss, training.validation_loss, training.to_device
        real_on_policy, real_scheduler = training.on_policy_batch, training.get_scheduler
        scripted = list(scripted_val or [])

        def training_loss(logits, batch, teacher, *, config, vocab_size):
            out = real_loss(logits, batch, teacher, config=config, vocab_size=vocab_size)
            self.losses.append(tuple(float(v.detach()) for v in out))
            self.batches.append(batch)
            return out

        def validation_loss(model, rows, *, micro_batch_size, pad_id, device):
            self.val_calls.append((rows, device))
            return scripted.pop(0) if scripted else real_val(model, rows, micro_batch_size=micro_batch_size,
                                                             pad_id=pad_id, device=device)

        def to_device(batch, device):
            self.to_device.append(device)
            return real_to_device(batch, device)

        def on_policy_batch(student, tokenizer, batch, *, config, device):
            self.on_policy.append((len(self.losses), device))
            return real_on_policy(student, tokenizer, batch, config=config, device=device)

        def get_scheduler(name, optimizer, num_warmup_steps, num_training_steps):
            self.schedulers.append({"warmup": num_warmup_steps, "total": num_training_steps})
            return real_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps,
                                  num_training_steps=num_training_steps)

        recorders = self

        class RecordingAdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                recorders.optimizers.append(self)

        for name, fn in [("training_loss", training_loss), ("validation_loss", validation_loss),
                         ("to_device", to_device), ("on_policy_batch", on_policy_batch),
                         ("get_scheduler", get_scheduler)]:
            patch.setattr(training, name, fn)
        patch.setattr(torch.optim, "AdamW", RecordingAdamW)

    def epoch_means(self, per_epoch: int, epoch: int) -> tuple[float, float, float]:
        rows = self.losses[(epoch - 1) * per_epoch:epoch * per_epoch]
        return tuple(sum(r[i] for r in rows) / len(rows) for i in range(3))


def linear_lr(lr: float, step: int, warmup: int, total: int) -> float:
    """transformers' linear schedule with warmup, written out."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# ---- an fkl run from a (fake) teacher cache, improved protocol ------------------------------

KD_CONFIG = dict(method="fkl", epochs=2, batch_size=4, micro_batch_size=2, lr=2e-3, weight_decay=0.1, warmup_steps=1,
                 max_length=64, lora=False, kd_weight=0.25, lmbda=1.0, temperature=2.0, noise_sigma=0.5,
                 val_examples=3, max_steps=2, loss_chunk_size=64, seed=0)


def fkl_run_from_a_cache(tiny_model_dir: Path, mix: list, out: Path, patch: pytest.MonkeyPatch) -> dict:
    """16 examples, 3 held out: 13 rows = 7 micro-batches of 2 = 3 steps of 4, capped at max_steps=2 per epoch."""
    stale = out / "checkpoints" / "epoch-2" / "stale.txt"  # no done marker: an interrupted save, to be cleared
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    model, tok = models.load_model(tiny_model_dir)
    source = FakeCacheSource(len(tok))
    opened = []

    def open_for_training(path, **kwargs):
        opened.append((path, kwargs))
        return source

    config = TrainConfig(**KD_CONFIG)
    expect = {"seed": 0, "teacher": "fake"}
    err, stdout = io.StringIO(), io.StringIO()
    rec = Recorders(patch, SCRIPTED_VAL)
    patch.setattr(teachers, "open_for_training", open_for_training)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        result = training.train(model, tok, mix[:16], config, out, teacher=teachers.CachedTeacher("the-cache", expect))
    return {"result": result, "rec": rec, "source": source, "opened": opened, "out": out, "tok": tok, "config": config,
            "expect": expect, "stderr": err.getvalue(), "stdout": stdout.getvalue()}


def test_fkl_run_from_a_teacher_cache(tiny_model_dir, mix, tmp_path, monkeypatch):
    """One run, checked in parts (one run per test, no shared fixture: mutmut maps a test to the code that
    the test itself calls, so a module fixture's run would count for the first of its tests only)."""
    run = fkl_run_from_a_cache(tiny_model_dir, mix, tmp_path / "out", monkeypatch)
    for check in (check_history_steps_learning_rates_and_loss_means, check_optimizer_lr_and_weight_decay,
                  check_cache_source_arguments_and_devices, check_returned_summary_and_history_file,
                  check_checkpoint_holds_what_a_resume_needs, check_progress_bar):
        check(run, mix)


def check_history_steps_learning_rates_and_loss_means(run: dict, mix: list) -> None:
    history, rec = run["result"]["history"], run["rec"]
    assert len(rec.losses) == 8  # 2 steps x 2 micro-batches per epoch, 2 epochs
    assert history[0] == {"epoch": 0, "step": 0, "val_loss": 3.0}
    for epoch in (1, 2):
        loss, ce, kd = rec.epoch_means(4, epoch)
        h = history[epoch]
        assert h["epoch"] == epoch and h["step"] == 2 * epoch
        assert h["lr"] == pytest.approx(linear_lr(2e-3, 2 * epoch, warmup=1, total=4), abs=1e-12)
        assert h["train_loss"] == pytest.approx(loss, rel=1e-9) and h["ce_loss"] == pytest.approx(ce, rel=1e-9)
        assert h["kd_loss"] == pytest.approx(kd, rel=1e-9) and kd > 0
        assert h["train_loss"] == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)  # kd_weight 0.25
        assert h["val_loss"] == SCRIPTED_VAL[epoch]
    assert history[1]["lr"] == pytest.approx(2e-3 * 2 / 3)  # the hand value of the line above, for the reader
    assert rec.schedulers == [{"warmup": 1, "total": 4}]


def check_optimizer_lr_and_weight_decay(run: dict, mix: list) -> None:
    (optimizer,) = run["rec"].optimizers
    assert optimizer.defaults["lr"] == 2e-3 and optimizer.defaults["weight_decay"] == 0.1


def check_cache_source_arguments_and_devices(run: dict, mix: list) -> None:
    """The cache is opened for this run's data, temperature, noise, length and epochs; every step asks it for
    targets on the training device and with the current epoch (each epoch its own draws)."""
    rec, tok, expect = run["rec"], run["tok"], run["expect"]
    (val_rows, _), *_ = rec.val_calls
    held_out = {r["id"] for r in val_rows}
    assert len(held_out) == 3  # val_examples=3, not the improved protocol's val_fraction (0.1 x 16 -> 2)
    train_examples = [e for e in mix[:16] if e.id not in held_out]
    (opened,) = run["opened"]
    assert opened == ("the-cache", {"tokenizer": tok, "train_examples": train_examples, "method": "fkl",
                                    "temperature": 2.0, "noise_sigma": 0.5, "max_length": 64, "epochs": 2,
                                    "expect": expect})
    assert run["source"].calls == [(CPU, 1)] * 4 + [(CPU, 2)] * 4
    assert {i for b in rec.batches for i in b["ids"]} <= {e.id for e in train_examples}
    assert rec.to_device and set(rec.to_device) == {CPU}
    assert [device for _, device in rec.val_calls] == [CPU] * 3
    assert rec.on_policy == []  # lmbda=1 draws on-policy batches for gkd only


def check_returned_summary_and_history_file(run: dict, mix: list) -> None:
    result, out = run["result"], run["out"]
    assert set(result) == {"history", "step_evals", "final_val_loss", "kept_epoch", "kept_step", "saved_to",
                           "precision"}
    # improved keeps the last epoch even though epoch 1 had the lower validation loss
    assert result["kept_epoch"] == 2 and result["final_val_loss"] == 2.0
    assert (result["step_evals"], result["kept_step"], result["precision"]) == ([], None, "fp32 (CPU)")
    assert result["saved_to"] == str(out / "model") and (out / "model" / "config.json").is_file()
    assert (out / "history.json").read_text() == json.dumps(result["history"], indent=1)


def check_checkpoint_holds_what_a_resume_needs(run: dict, mix: list) -> None:
    out, config = run["out"], run["config"]
    path = out / "checkpoints" / "epoch-1"
    assert (path / "done").is_file() and (path / "state").is_dir() and (path / "model" / "config.json").is_file()
    trainer = json.loads((path / "trainer.json").read_text())
    assert trainer["history"] == run["result"]["history"][:2]
    assert trainer["teacher_source"] == {"calls": 4}
    assert trainer["config"] == json.loads(json.dumps(asdict(config)))
    assert trainer["config"]["method"] == "fkl" and trainer["config"]["kd_weight"] == 0.25
    rng = random.Random()
    rng.setstate(checkpoints.random_state(trainer["policy_rng"]))
    # gkd's own stream (seeds.ON_POLICY), not drawn from by fkl
    assert rng.random() == random.Random(seeds.stream_seed(0, seeds.ON_POLICY)).random()
    assert not (out / "checkpoints" / "epoch-2" / "stale.txt").exists()  # a checkpoint dir is cleared before saving
    assert (out / "checkpoints" / "epoch-2" / "done").is_file()


def check_progress_bar(run: dict, mix: list) -> None:
    """The bar names the method and epoch, shows the micro-batch loss, and is wiped when the epoch ends."""
    err, rec = run["stderr"], run["rec"]
    assert "fkl epoch 1/2" in err and "fkl epoch 2/2" in err
    assert f"loss={rec.losses[0][0]:.4f}" in err and f"loss={rec.losses[-1][0]:.4f}" in err
    # leave=False: the bar is wiped at the end of each epoch, no finished bar stays behind on its own line
    assert not [line for line in err.splitlines(keepends=True) if "epoch" in line and line.endswith("\n")]
    assert "resuming" not in run["stdout"]


# ---- sft under the paper protocol with LoRA: the best epoch is kept ------------------------

def test_sft_run_under_the_paper_protocol_with_lora(tiny_model_dir, mix, tmp_path, monkeypatch):
    """12 examples: the paper's 500 held out shrinks to 12 - 8 = 4; 8 rows, 4 steps of 2 per epoch.
    Validated per epoch (eval_steps switched off): the best epoch is kept."""
    out = tmp_path / "out"
    model, tok = models.load_model(tiny_model_dir)
    config = TrainConfig(method="sft", protocol="paper[eval_steps=null]", epochs=2, batch_size=2, micro_batch_size=2,
                         lr=1e-2, max_length=24, lora=True, lora_r=2, seed=0)
    # the untrained model scores best: the kept epoch is still the best trained one
    rec = Recorders(monkeypatch, [0.5, *SCRIPTED_VAL[1:]])
    with contextlib.redirect_stderr(io.StringIO()):
        result = training.train(model, tok, mix[:12], config, out)
    run = {"result": result, "rec": rec, "out": out}
    for check in (check_paper_keeps_the_best_epochs_adapter, check_paper_warmup_and_held_out_rows,
                  check_paper_rows_are_cut_at_max_length_and_label_the_prompt):
        check(run)


def check_paper_keeps_the_best_epochs_adapter(run: dict) -> None:
    result, out = run["result"], run["out"]
    assert result["kept_epoch"] == 1 and result["final_val_loss"] == 1.0
    assert result["saved_to"] == str(out / "adapter")
    read = lambda d: (d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    best, last = out / "checkpoints" / "epoch-1" / "adapter", out / "checkpoints" / "epoch-2" / "adapter"
    assert read(out / "adapter") == read(best) != read(last)
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model").exists()
    assert json.loads((out / "history.json").read_text()) == result["history"]


def check_paper_warmup_and_held_out_rows(run: dict) -> None:
    history, rec = run["result"]["history"], run["rec"]
    assert [h["step"] for h in history] == [0, 4, 8]
    # the paper's 100 warmup steps: still warming up after 8 steps
    assert [h["lr"] for h in history[1:]] == pytest.approx([1e-2 * 4 / 100, 1e-2 * 8 / 100])
    assert rec.schedulers == [{"warmup": 100, "total": 8}]
    (val_rows, _), *_ = rec.val_calls
    assert len(val_rows) == 4 and len(rec.losses) == 8


def check_paper_rows_are_cut_at_max_length_and_label_the_prompt(run: dict) -> None:
    rec = run["rec"]
    (val_rows, _), *_ = rec.val_calls
    widths = [b["input_ids"].shape[1] for b in rec.batches]
    assert max(widths) == 24 and max(len(r["input_ids"]) for r in val_rows) == 24  # every example is longer
    # train_on_inputs: the prompt's first token is labelled, in training batches and held-out rows alike
    assert all((b["labels"][:, 0] != -100).all() for b in rec.batches)
    assert all(r["labels"][0] == r["input_ids"][0] for r in val_rows)
    assert all(r["prompt"].startswith("Below is an instruction") for r in val_rows)


def test_paper_validates_every_eval_steps_and_keeps_the_best_step(tiny_model_dir, mix, tmp_path, monkeypatch):
    """finetune.py: evaluation every eval_steps optimizer steps, load_best_model_at_end over those evaluations.
    8 steps in 2 epochs, eval_steps=3: validation at epoch 0, step 3, epoch 1 (step 4), step 6, epoch 2 (step 8)."""
    out = tmp_path / "out"
    model, tok = models.load_model(tiny_model_dir)
    config = TrainConfig(method="sft", protocol="paper[eval_steps=3]", epochs=2, batch_size=2, micro_batch_size=2,
                         lr=1e-2, max_length=24, lora=True, lora_r=2, seed=0)
    saved = {}
    real_save = checkpoints.save_trained

    def save_trained(model, tokenizer, target):
        real_save(model, tokenizer, target)
        saved[target] = (target / "adapter_model.safetensors").read_bytes()

    monkeypatch.setattr(training, "save_trained", save_trained)  # the step evaluations' saves
    rec = Recorders(monkeypatch, [5.0, 2.0, 0.5, 1.0, 0.4])  # the epoch evaluations are not candidates
    with contextlib.redirect_stderr(io.StringIO()):
        result = training.train(model, tok, mix[:12], config, out)
    assert result["step_evals"] == [{"step": 3, "epoch": 1, "val_loss": 2.0}, {"step": 6, "epoch": 2, "val_loss": 1.0}]
    assert (result["kept_step"], result["kept_epoch"], result["final_val_loss"]) == (6, 2, 1.0)
    step_dirs = [out / "checkpoints" / f"step-{s}" / "adapter" for s in (3, 6)]
    assert [d in saved for d in step_dirs] == [True, True]  # each improvement was written when it happened
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == saved[step_dirs[1]] != saved[step_dirs[0]]
    assert saved[step_dirs[1]] != (out / "checkpoints" / "epoch-2" / "adapter"
                                   / "adapter_model.safetensors").read_bytes()
    assert not step_dirs[0].exists() and step_dirs[1].exists()  # the kept step stays, the others are cleared
    assert len(rec.val_calls) == 5 and [h["val_loss"] for h in result["history"]] == [5.0, 0.5, 0.4]


def test_a_paper_run_shorter_than_eval_steps_keeps_its_final_weights(tiny_model_dir, mix, tmp_path, monkeypatch):
    """The Trainer's load_best_model_at_end has nothing to load when no step was evaluated."""
    model, tok = models.load_model(tiny_model_dir)
    config = TrainConfig(method="sft", protocol="paper", epochs=2, batch_size=2, micro_batch_size=2, lr=1e-2,
                         max_length=24, lora=True, lora_r=2, seed=0)
    Recorders(monkeypatch, [5.0, 1.0, 3.0])  # epoch 1 would be the best epoch
    with contextlib.redirect_stderr(io.StringIO()):
        result = training.train(model, tok, mix[:12], config, tmp_path / "out")
    assert result["step_evals"] == [] and (result["kept_epoch"], result["kept_step"]) == (2, None)
    read = lambda d: (d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read(tmp_path / "out" / "adapter") == read(tmp_path / "out" / "checkpoints" / "epoch-2" / "adapter")


@pytest.mark.parametrize("protocol, clip", [("paper[eval_steps=null]", 1.0), ("improved[max_grad_norm=0.001]", 0.001),
                                            ("improved", None)])
def test_gradients_are_clipped_at_the_protocols_norm(tiny_model_dir, mix, tmp_path, monkeypatch, protocol, clip):
    """Once per optimizer step, after accumulation (the Trainer's max_grad_norm): the step's gradient norm <= clip."""
    seen = []
    real = Accelerator.clip_grad_norm_

    def clip_grad_norm_(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        out = real(self, parameters, max_norm, *args, **kwargs)
        grads = [p.grad for p in parameters if p.grad is not None]
        seen.append((max_norm, float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))))
        return out

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_grad_norm_)
    model, tok = models.load_model(tiny_model_dir)
    config = TrainConfig(method="sft", protocol=protocol, epochs=1, batch_size=4, micro_batch_size=2, lr=1e-3,
                         max_length=32, lora=False, seed=0, max_steps=2)
    with contextlib.redirect_stderr(io.StringIO()):
        training.train(model, tok, mix[:10], config, tmp_path / "out", val_examples=[])
    assert [m for m, _ in seen] == ([clip] * 2 if clip else [])
    assert all(norm <= clip * (1 + 1e-4) for _, norm in seen)


# ---- gkd's on-policy draws, from an online teacher -----------------------------------------

def test_gkd_draws_on_policy_batches_with_probability_lmbda(tiny_model_dir, mix, tmp_path, monkeypatch):
    teacher, tok = models.load_model(tiny_model_dir)
    student, _ = models.load_model(tiny_model_dir)
    made = []

    class RecordingTeacher(teachers.OnlineTeacher):
        def open(self, *, tokenizer, train_examples, config, device=None):
            made.append((config.noise_sigma, config.seed, device))
            return super().open(tokenizer=tokenizer, train_examples=train_examples, config=config, device=device)

    rec = Recorders(monkeypatch)
    config = TrainConfig(method="gkd", epochs=1, batch_size=1, micro_batch_size=1, max_length=64, lora=False,
                         lmbda=0.5, noise_sigma=0.25, gkd_max_new_tokens=3, seed=3)
    with contextlib.redirect_stderr(io.StringIO()):
        training.train(student, tok, mix[:8], config, tmp_path / "out", teacher=RecordingTeacher(teacher),
                       val_examples=[])
    draws = random.Random(seeds.stream_seed(3, seeds.ON_POLICY))
    expected = [i for i in range(8) if draws.random() < 0.5]
    assert 0 < len(expected) < 8
    assert rec.on_policy == [(i, CPU) for i in expected]
    assert made == [(0.25, 3, CPU)]


# ---- one step per epoch, killed and resumed ------------------------------------------------

def test_single_batch_epochs_resume_after_the_last_checkpoint(tiny_model_dir, mix, tmp_path, monkeypatch, capsys):
    """2 rows fill exactly one batch: 1 step and 1 micro-batch per epoch; warmup_ratio 0.5 of 2 steps = 1."""
    config = dict(epochs=2, batch_size=2, micro_batch_size=2, lr=1e-2, warmup_ratio=0.5, max_length=64, lora=False,
                  seed=0)
    out = tmp_path / "out"
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(Killed):
        training.train(model, tok, mix[:2], TrainConfig(**config), out, val_examples=mix[2:3], on_epoch_end=kill)
    assert training.last_checkpoint(out) == (1, out / "checkpoints" / "epoch-1")
    rec = Recorders(monkeypatch)
    ended = []
    model, tok = models.load_model(tiny_model_dir)
    result = training.train(model, tok, mix[:2], TrainConfig(**config), out, val_examples=mix[2:3],
                            on_epoch_end=ended.append)
    assert ended == [2]
    assert f"resuming after epoch 1 from {out / 'checkpoints' / 'epoch-1'}" in capsys.readouterr().out
    history = result["history"]
    assert [h["step"] for h in history] == [0, 1, 2]
    assert history[1]["lr"] == pytest.approx(linear_lr(1e-2, 1, warmup=1, total=2)) == 1e-2
    assert history[2]["lr"] == 0
    (only,) = rec.losses  # the resumed epoch's one micro-batch: its loss is the epoch's mean
    assert history[2]["train_loss"] == pytest.approx(only[0], rel=1e-9) and history[2]["kd_loss"] == 0


# ---- what an epoch checkpoint holds ------------------------------------------------------

def checkpoint_weights(out: Path, epoch: int = 1) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"epoch-{epoch}" / "state" / "model.safetensors"))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_checkpoint_holds_exactly_the_trained_weights(tiny_model_dir, mix, tmp_path, lora):
    """LoRA: the adapter's weights and nothing of the frozen base; full fine-tuning: every weight
    (the tied output embedding once), each equal to the trained model's."""
    model, tok = models.load_model(tiny_model_dir)
    config = TrainConfig(epochs=1, batch_size=2, micro_batch_size=2, max_length=64, lora=lora, lora_r=2, seed=0)
    training.train(model, tok, mix[:4], config, tmp_path / "out", val_examples=mix[4:5])
    saved = checkpoint_weights(tmp_path / "out")
    # peft injected its layers into `model` in place; the checkpoint names them as the PeftModel does
    prefix = "base_model.model." if lora else ""
    params = {prefix + name: p for name, p in model.named_parameters()}  # deduplicated: lm_head is embed_tokens
    if lora:
        params = {name: p for name, p in params.items() if ".lora_A." in name or ".lora_B." in name}
        assert len(params) == 2 * 5 * model.config.num_hidden_layers  # A and B on q, k, v, up, down
    else:
        assert "lm_head.weight" not in params
    assert set(saved) == set(params)
    assert all(torch.equal(saved[name], params[name].detach()) for name in saved)


def test_resuming_needs_every_trained_weight_in_the_checkpoint(tiny_model_dir, mix, tmp_path):
    """A LoRA run's checkpoint cannot resume full fine-tuning: refused before anything is loaded."""
    out = tmp_path / "out"
    common = dict(epochs=2, batch_size=2, micro_batch_size=2, max_length=64, seed=0)
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(Killed):
        training.train(model, tok, mix[:2], TrainConfig(lora=True, lora_r=2, **common), out, val_examples=mix[2:3],
                       on_epoch_end=kill)
    state = out / "checkpoints" / "epoch-1" / "state"
    model, tok = models.load_model(tiny_model_dir)
    message = (f"checkpoint {state} lacks {sum(1 for _ in model.parameters())} trained weights of this run (e.g. "
               f"{sorted(n for n, _ in model.named_parameters())[0]!r}): another configuration wrote it; remove "
               f"{out / 'checkpoints'} to train from the start")
    with pytest.raises(ValueError, match=exactly(message)):
        training.train(model, tok, mix[:2], TrainConfig(lora=False, **common), out, val_examples=mix[2:3])


def test_a_checkpoint_with_the_whole_model_still_resumes(tiny_model_dir, mix, tmp_path):
    """Checkpoints written before they were trimmed hold every weight: extra frozen weights are accepted."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    config = dict(epochs=2, batch_size=2, micro_batch_size=2, max_length=64, lora=True, lora_r=2, seed=0)
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(Killed):
        training.train(model, tok, mix[:2], TrainConfig(**config), out, val_examples=mix[2:3],
                       on_epoch_end=kill)
    lora_weights = checkpoint_weights(out)
    whole = {name: p.detach().clone() for name, p in model.named_parameters()} | lora_weights
    save_file(whole, str(out / "checkpoints" / "epoch-1" / "state" / "model.safetensors"))
    model, tok = models.load_model(tiny_model_dir)
    result = training.train(model, tok, mix[:2], TrainConfig(**config), out, val_examples=mix[2:3])
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]


def test_a_run_without_validation_writes_standard_json_and_resumes_with_nan(tiny_model_dir, mix, tmp_path):
    """No validation examples: every val_loss is NaN in memory, null in history.json, train_summary.json and
    the checkpoint's trainer.json (standard JSON), and NaN again in a resumed run's history."""
    from test_io import strict_loads

    config = TrainConfig(epochs=2, batch_size=2, micro_batch_size=2, max_length=64, lora=True, lora_r=2, seed=0)
    out = tmp_path / "out"
    model, tok = models.load_model(tiny_model_dir)
    with pytest.raises(Killed):
        training.train(model, tok, mix[:2], config, out, val_examples=[], on_epoch_end=kill)
    saved = strict_loads((out / "checkpoints" / "epoch-1" / "trainer.json").read_text())
    assert [h["val_loss"] for h in saved["history"]] == [None, None]
    model, tok = models.load_model(tiny_model_dir)
    result = training.train(model, tok, mix[:2], config, out, val_examples=[])
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert all(math.isnan(h["val_loss"]) for h in result["history"])
    assert result["kept_epoch"] == 2 and math.isnan(result["final_val_loss"])
    written = strict_loads((out / "history.json").read_text())
    assert [h["val_loss"] for h in written] == [None, None, None]
    assert written[1]["train_loss"] == result["history"][1]["train_loss"]


def test_run_training_writes_a_standard_json_summary(tiny_model_dir, data_dir, tmp_path):
    from test_io import strict_loads

    summary = training.run_training(str(tiny_model_dir), tmp_path / "out", data_dir=str(data_dir), n_train=4,
                                    epochs=1, batch_size=2, micro_batch_size=2, max_length=64, val_fraction=0.0,
                                    seed=0)
    assert math.isnan(summary["final_val_loss"])
    written = strict_loads((tmp_path / "out" / "train_summary.json").read_text())
    assert written["final_val_loss"] is None and written["n_train"] == 4


# ---- as the second of two processes --------------------------------------------------------

class SecondOfTwo(Accelerator):
    """accelerate as process 1 of 2 sees it (the state underneath is still one process: one scheduler step per step)."""

    num_processes = 2
    process_index = 1
    is_main_process = False
    is_local_main_process = False


def test_second_of_two_processes_trains_its_share_and_writes_nothing_final(tiny_model_dir, mix, tmp_path,
                                                                          monkeypatch):
    """12 rows, batch 4 = 1 row x 2 accumulation x 2 processes: 6 rows here, 3 steps per epoch."""
    monkeypatch.setattr(training, "Accelerator", SecondOfTwo)
    rec = Recorders(monkeypatch)
    model, tok = models.load_model(tiny_model_dir)
    err = io.StringIO()
    config = TrainConfig(epochs=2, batch_size=4, micro_batch_size=1, warmup_steps=1, max_length=64, lora=False, seed=0)
    with contextlib.redirect_stderr(err):
        result = training.train(model, tok, mix[:12], config, tmp_path / "out", val_examples=mix[12:14])
    assert [h["step"] for h in result["history"]] == [0, 3, 6]
    # the schedule counts the scheduler steps of every process: 2 per optimizer step
    assert rec.schedulers == [{"warmup": 2, "total": 12}]
    assert {i for b in rec.batches for i in b["ids"]} == {mix[i].id for i in range(1, 12, 2)}
    assert len(rec.losses) == 12
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "history.json").exists()
    assert "epoch 1/2" not in err.getvalue()  # only the local main process shows a progress bar


def test_batch_must_split_over_the_processes(tiny_model_dir, mix, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "Accelerator", SecondOfTwo)
    tok = models.load_tokenizer(tiny_model_dir)
    config = TrainConfig(batch_size=2, micro_batch_size=2, lora=False)
    message = "batch_size=2 must be a multiple of micro_batch_size x processes = 2 x 2"
    with pytest.raises(ValueError, match=exactly(message)):
        training.train(None, tok, mix, config, tmp_path / "out")


# ---- checks before any work ----------------------------------------------------------------

@pytest.mark.parametrize("cuda, bf16, protocol, expected", [
    (True, True, "improved", "bf16"), (True, False, "improved", "no"), (True, False, "improved[precision=fp32]", "no"),
    (True, True, "paper", "fp16"),
    # a CPU: auto is what KD_AUTO_PRECISION pins (the tests: fp32; a study: its precision.json), fp16 is fp32
    (False, True, "improved", "no"), (False, True, "paper", "no"), (False, True, "improved[precision=bf16]", "bf16"),
    (False, True, "improved@bf16", "bf16"),
])
def test_the_protocols_precision_reaches_accelerate(tiny_model_dir, mix, tmp_path, monkeypatch, cuda, bf16, protocol,
                                                    expected):
    if protocol.endswith("@bf16"):  # auto on a CPU with bf16 pinned
        protocol = protocol.removesuffix("@bf16")
        monkeypatch.setenv("KD_AUTO_PRECISION", "bf16")
    seen = []

    def accelerator(**kwargs):
        seen.append(kwargs)
        raise Stop()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(training, "Accelerator", accelerator)
    with pytest.raises(Stop):
        training.train(None, models.load_tokenizer(tiny_model_dir), mix, TrainConfig(protocol=protocol),
                       tmp_path / "out")
    assert seen == [{"mixed_precision": expected}]


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_switch(monkeypatch):
    """An explicit bf16 is refused there (auto falls back to fp32, see
    test_the_protocols_precision_reaches_accelerate)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match=re.escape("this GPU has no bf16; switch it with precision=fp32")):
        training.mixed_precision(TrainConfig(protocol="improved[precision=bf16]"))


def test_errors_before_training(tiny_model_dir, mix, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=exactly("method 'rkl' needs a teacher (teachers.OnlineTeacher or "
                                                 "teachers.CachedTeacher)")):
        training.train(model, tok, mix, TrainConfig(method="rkl"), out)
    with pytest.raises(ValueError, match=exactly("no training examples")):
        training.train(model, tok, [], TrainConfig(), out, val_examples=mix[:2])
    with pytest.raises(ValueError, match=exactly("3 training examples do not fill one batch of 8")):
        # 3 rows make 2 micro-batches of 2, fewer than the 4 of one batch of 8
        training.train(model, tok, mix[:3], TrainConfig(batch_size=8, micro_batch_size=2, lora=False), out,
                       val_examples=[])
    assert not out.exists()


@pytest.mark.parametrize("field, value, message", [
    ("method", "kd", "method: expected one of sft, fkl, rkl, gkd, seqkd, got 'kd' (did you mean 'gkd'?)"),
    ("beta", 1.0001, "beta: 1.0001 must be in [0, 1]"),
    ("beta", -0.5, "beta: -0.5 must be in [0, 1]"),
    ("lmbda", 1.5, "lmbda: 1.5 must be in [0, 1]"),
    ("lmbda", -0.1, "lmbda: -0.1 must be in [0, 1]"),
    ("kd_weight", 1.5, "kd_weight: 1.5 must be in [0, 1]"),
    ("kd_weight", -0.1, "kd_weight: -0.1 must be in [0, 1]"),
    ("epochs", 0, "epochs: 0 must be >= 1"),
    ("micro_batch_size", 0, "micro_batch_size: 0 must be >= 1"),
    ("micro_batch_size", 3, "batch_size: 16 must be a multiple of micro_batch_size 3"),
    ("distill_positions", "all", "distill_positions: expected one of paper, next_token, response or null, got 'all'"),
    ("val_fraction", 1.0, "val_fraction: 1.0 must be in [0, 1)"),
    ("val_fraction", 1.5, "val_fraction: 1.5 must be in [0, 1)"),
    ("max_length", 7, "max_length: 7 must be >= 8"),
    ("temperature", 0.0, "temperature: 0.0 must be > 0"),
    ("temperature", math.nan, "temperature: nan must be > 0"),
    ("noise_sigma", -1.0, "noise_sigma: -1.0 must be >= 0"),
    ("loss_chunk_size", 0, "loss_chunk_size: 0 must be >= 1"),
    ("lr", "fast", "lr: expected a number, got 'fast'"),
    ("lora", 1, "lora: expected true or false, got 1"),
])
def test_validate_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=exactly(message)):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("field, values", [
    ("beta", [0.0, 1.0]), ("lmbda", [0.0, 1.0]), ("kd_weight", [0.0, 1.0]), ("val_fraction", [0.0, 0.999]),
    ("max_length", [8]), ("distill_positions", [None, "paper", "response"]), ("epochs", [1]),
    ("micro_batch_size", [1, 16]), ("loss_chunk_size", [None, 1]),
])
def test_validate_accepts_the_boundaries(field, values):
    for value in values:
        assert getattr(TrainConfig(**{field: value}).validate(), field) == value


# ---- small helpers -------------------------------------------------------------------------

def test_last_checkpoint_is_the_highest_complete_epoch(tmp_path):
    assert training.last_checkpoint(tmp_path) is None
    for epoch, done in ((9, True), (10, True), (11, False)):
        path = tmp_path / "checkpoints" / f"epoch-{epoch}"
        path.mkdir(parents=True)
        if done:
            (path / "done").touch()
    # 10 > 9 as numbers (not as text); epoch 11 has no done marker: its save was interrupted
    assert training.last_checkpoint(tmp_path) == (10, tmp_path / "checkpoints" / "epoch-10")
    (tmp_path / "checkpoints" / "epoch-10" / "done").unlink()
    assert training.last_checkpoint(tmp_path) == (9, tmp_path / "checkpoints" / "epoch-9")


def test_save_trained_replaces_stale_dirs_with_safetensors(tiny_model_dir, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    model = training.wrap_lora(model, TrainConfig(lora_r=2))
    target, tmp = tmp_path / "adapter", tmp_path / ".adapter.tmp"
    for stale in (target, tmp):  # a previous save's result and an interrupted save's leftovers
        stale.mkdir()
        (stale / "stale.txt").write_text("old")
    training.save_trained(model, tok, target)
    names = {p.name for p in target.iterdir()}
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names and "tokenizer.json" in names
    assert "stale.txt" not in names and not any(n.endswith(".bin") for n in names) and not tmp.exists()


def test_wrap_lora_passes_the_config_to_peft(tiny_model_dir):
    model, _ = models.load_model(tiny_model_dir)
    config = TrainConfig(lora_r=2, lora_alpha=5, lora_dropout=0.25, lora_target_modules=["q_proj", "down_proj"])
    wrapped = training.wrap_lora(model, config)
    lora = wrapped.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (2, 5, 0.25)
    assert set(lora.target_modules) == {"q_proj", "down_proj"} and lora.task_type == "CAUSAL_LM"
    assert type(wrapped).__name__ == "PeftModelForCausalLM"
    adapted = {name.split(".")[-2] for name, _ in wrapped.named_modules() if name.endswith("lora_A")}
    assert adapted == {"q_proj", "down_proj"}


def test_lora_on_fp16_weights_trains_in_fp32(tiny_model_dir):
    """precision fp16 (the authors'): the frozen weights in fp16, the trained LoRA weights in fp32, as the
    gradient scaler needs (peft casts fp16 adapters up)."""
    model, _ = models.load_model(tiny_model_dir)
    wrapped = training.wrap_lora(model.to(torch.float16), TrainConfig())
    dtypes = {p.requires_grad: {q.dtype for q in wrapped.parameters() if q.requires_grad == p.requires_grad}
              for p in wrapped.parameters()}
    assert dtypes == {True: {torch.float32}, False: {torch.float16}}


def test_wrap_lora_names_missing_modules(tiny_model_dir):
    model, _ = models.load_model(tiny_model_dir)
    with pytest.raises(ValueError, match=exactly("lora_target_modules ['c_attn', 'wq'] are not modules of this model")):
        training.wrap_lora(model, TrainConfig(lora_target_modules=["q_proj", "c_attn", "wq"]))


def test_named_random_streams_are_fixed_by_the_seed_and_the_name():
    streams = {(seed, name): seeds.stream_seed(seed, name) for seed in (0, 1, 2)
               for name in (seeds.ON_POLICY, seeds.TEACHER_NOISE)}
    assert len(set(streams.values())) == 6  # no stream of one seed is a stream of another (as seed + 1 was)
    assert seeds.stream_seed(0, seeds.ON_POLICY) == streams[0, seeds.ON_POLICY]
    # the teacher cache's per-example draws are seeded by the same derivation
    from kd_utils import teacher_cache

    assert teacher_cache.example_generator(3, "ex-1", "draws").initial_seed() == seeds.stream_seed(3, "ex-1", "draws")
