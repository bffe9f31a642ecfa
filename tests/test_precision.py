"""precision: what auto resolves to, CPU bf16 detection, bf16 training / evaluation on a CPU, a study's pinned auto."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_training import mix, tiny_config  # noqa: F401 (mix: the training tests' 20 examples, a fixture)

from kd_utils import evaluation, models, precision, study, training


@pytest.fixture()
def machine(monkeypatch):
    """A fake machine: set .cuda, .cuda_bf16, .cpu_bf16 (no pinned auto unless a test sets one)."""
    class Machine:
        cuda = cuda_bf16 = cpu_bf16 = False

    m = Machine()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: m.cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: m.cuda_bf16)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: m.cpu_bf16)
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    return m


@pytest.mark.parametrize("cuda, cuda_bf16, cpu_bf16, asked, expected", [
    (False, False, True, "auto", "bf16"), (False, False, False, "auto", "fp32"),
    (False, False, True, "fp16", "fp32"),  # no fast fp16 on a CPU: the paper protocol trains fp32 there
    (False, False, False, "bf16", "bf16"), (False, False, True, "fp32", "fp32"),
    (True, True, False, "auto", "bf16"), (True, False, True, "auto", "fp32"), (True, False, False, "fp16", "fp16"),
])
def test_resolve(machine, cuda, cuda_bf16, cpu_bf16, asked, expected):
    machine.cuda, machine.cuda_bf16, machine.cpu_bf16 = cuda, cuda_bf16, cpu_bf16
    assert precision.resolve(asked) == expected


def test_a_pinned_auto_wins_on_a_cpu_only(machine, monkeypatch):
    machine.cpu_bf16 = True
    monkeypatch.setenv(precision.AUTO_ENV, "fp32")
    assert precision.resolve("auto", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    machine.cuda = machine.cuda_bf16 = True
    assert precision.resolve("auto", "cuda") == "bf16"
    monkeypatch.setenv(precision.AUTO_ENV, "fp16")
    with pytest.raises(ValueError, match="KD_AUTO_PRECISION must be fp32 or bf16, got 'fp16'"):
        precision.resolve("auto", "cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        precision.resolve("half")


@pytest.mark.parametrize("flags, onednn, expected", [
    ({"avx512f", "avx512_bf16"}, True, True), ({"amx_bf16"}, True, True), ({"bf16", "asimd"}, True, True),
    ({"avx512f", "avx512bw"}, True, False),  # AVX-512 without a bf16 instruction: oneDNN emulates, slowly
    ({"avx512_bf16"}, False, False),
])
def test_cpu_bf16_needs_a_bf16_instruction_and_onednn(monkeypatch, flags, onednn, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert precision.cpu_has_native_bf16.__wrapped__() is expected


def test_bf16_training_on_a_cpu_keeps_fp32_weights_and_a_close_loss(tiny_model_dir, mix, tmp_path):
    """bf16 autocast on a CPU: the weights stay fp32, the run records bf16, the loss is close to fp32's."""
    finals = {}
    for asked in ("fp32", "bf16"):
        model, tok = models.load_model(tiny_model_dir)
        config = tiny_config(epochs=1, protocol=f"improved[precision={asked}]")
        result = training.train(model, tok, mix, config, tmp_path / asked)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        finals[asked] = result
    assert finals["bf16"]["precision"] == "bf16 autocast, fp32 weights (CPU)"
    assert finals["fp32"]["precision"] == "fp32 (CPU)"
    fp32, bf16 = finals["fp32"]["final_val_loss"], finals["bf16"]["final_val_loss"]
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * fp32  # bf16 ran, and kept ~2-3 significant digits


def test_evaluation_records_the_resolved_precision(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    model, tok = models.load_model(tiny_model_dir)
    common = dict(n_per_task=2, data_dir=data_dir, batch_size=2, max_new_tokens={"math": 6})
    fp32 = evaluation.evaluate_tasks(model, tok, ["gsm8k"], output_dir=tmp_path / "a", **common)
    monkeypatch.setenv(precision.AUTO_ENV, "bf16")
    bf16 = evaluation.evaluate_tasks(model, tok, ["gsm8k"], output_dir=tmp_path / "b", **common)
    assert fp32["precision"].tolist() == ["fp32"] and bf16["precision"].tolist() == ["bf16"]
    assert pd.read_csv(tmp_path / "b" / "metrics.csv")["precision"].tolist() == ["bf16"]


def test_a_study_pins_auto_once(tmp_path, monkeypatch):
    new, old = tmp_path / "new", tmp_path / "old"
    monkeypatch.setenv(precision.AUTO_ENV, "bf16")  # what this machine's auto resolves to
    new.mkdir()
    assert study.pin_auto_precision(new) == "bf16"
    # a study with runs from before the pin existed ran fp32 on a CPU, and resumes in fp32
    (old / "runs" / "eval-1").mkdir(parents=True)
    (old / "runs" / "eval-1" / "status.json").write_text('{"state": "done"}')
    assert study.pin_auto_precision(old) == "fp32"
    assert json.loads((old / "precision.json").read_text())["cpu_auto"] == "fp32"
    # the file wins on any later start, whatever the machine's own auto is
    monkeypatch.setenv(precision.AUTO_ENV, "fp32")
    assert study.pin_auto_precision(new) == "bf16"
    assert precision.resolve("auto", "cpu") == "bf16"  # and the kernels see it


def _weight_casts(model, ids, context) -> tuple[int, torch.Tensor]:
    """(casts to bf16 over two forwards in one context, the second forward's logits)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, context:
        model(input_ids=ids)
        logits = model(input_ids=ids).logits
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return casts, logits.float()


def test_inference_autocast_casts_frozen_weights_once_with_the_same_numbers(tiny_model_dir):
    model, _ = models.load_model(tiny_model_dir)
    model.requires_grad_(False)  # as a peft base or a merged teacher
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    plain_casts, plain = _weight_casts(model, ids, precision.autocast("bf16", "cpu"))
    cached_casts, cached = _weight_casts(model, ids, precision.inference_autocast(model, "bf16", "cpu"))
    assert torch.equal(plain, cached)
    # plain autocast cast every linear layer's weight again in the second forward; the rest are activations
    assert plain_casts - cached_casts == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_inference_autocast_restores_the_flags_after_an_error(tiny_model_dir):
    model, _ = models.load_model(tiny_model_dir)
    trainable = {name for name, p in model.named_parameters() if "q_proj" in name}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    with pytest.raises(RuntimeError, match="boom"), precision.inference_autocast(model, "bf16", "cpu"):
        assert all(p.requires_grad for p in model.parameters()) and not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    with precision.inference_autocast(model, "fp32", "cpu"):  # fp32: no autocast, no flag changes, no grad
        assert not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
