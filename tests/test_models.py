import pytest
import torch

from kd_utils import models


def test_missing_model_path_and_adapter_fail_fast(tmp_path):
    with pytest.raises(models.ModelError, match="neither a local model directory nor a hub id"):
        models.load_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(models.ModelError, match="neither a local model directory nor a hub id"):
        models.load_model("not a model id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.load_model(tmp_path / "empty")
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids pass through


def test_missing_adapter_dir_fails_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(models.ModelError, match="adapter directory .*nope"):
        models.load_model(tiny_model_dir, adapter=tmp_path / "nope")


def test_student_layer_choice():
    assert models.student_layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert models.student_layer_indices(4, 2) == [0, 3]
    assert models.student_layer_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep=5"):
        models.student_layer_indices(4, 5)


def test_student_keeps_the_chosen_layers_and_generates(tiny_model_dir, tmp_path):
    model, tok = models.load_model(tiny_model_dir)
    ids = tok(["Tom has 3 apples"], return_tensors="pt")
    full = models.make_student(model, model.config.num_hidden_layers)
    torch.testing.assert_close(full(**ids).logits, model(**ids).logits)  # keeping every layer changes nothing
    student_dir = models.build_student_dir(tiny_model_dir, 1, tmp_path / "student")
    student, _ = models.load_model(student_dir)
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(student.model.layers[0].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    out = student.generate(**ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_interrupted_save_leaves_no_model(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = models.load_model(tiny_model_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tok, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        models.save_model_dir(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_tokenizer_is_set_up_for_left_padded_batches(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["a", "a much longer prompt"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


@pytest.mark.embedded
def test_gguf_conversion_round_trip(embedded_dir):
    """The cached safetensors model gives the GGUF-loaded model's logits."""
    gguf_model, gguf_tok = models.load_gguf(models.embedded_gguf_path())
    converted, tok = models.load_model(embedded_dir)
    prompt = "Below is an instruction. ### Instruction:\nWhat is 2 + 3?\n\n### Response:\n"
    assert tok(prompt)["input_ids"] == gguf_tok(prompt)["input_ids"]
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(converted(**ids).logits, gguf_model.eval()(**ids).logits, rtol=0, atol=0)
    assert not hasattr(converted.config, "quantization_config")
