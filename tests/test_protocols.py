"""The `paper` protocol pinned to the authors' code (KD_generalization, generative/), and the bugs fixed with it."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kd_utils import batches, evaluation, models, protocols, study, teachers, training
from kd_utils.data import Example
from kd_utils.params import DEFAULTS, ParamsError, load_study, validate
from kd_utils.tasks import build_prompt

SP = " " * 16  # the authors' f-strings are indented inside their functions


def test_the_authors_training_prompt_byte_for_byte():
    """finetune.py generate_prompt: a trailing space (two without input) and indented, whitespace-only lines."""
    assert build_prompt("Add.", "2 and 3", "paper_train") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        f"{SP}### Instruction:\n{SP}Add.\n{SP}\n{SP}### Input:\n{SP}2 and 3\n{SP}\n{SP}### Response:\n{SP}")
    assert build_prompt("Add 2 and 3.", "", "paper_train") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.  \n\n"
        f"{SP}### Instruction:\n{SP}Add 2 and 3.\n{SP}\n{SP}### Response:\n{SP}")


def test_the_authors_evaluation_prompt_byte_for_byte():
    """evaluate.py / commonsense_evaluate.py generate_prompt: empty blank lines, a trailing space only without input."""
    assert build_prompt("Add.", "2 and 3", "paper_eval") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"{SP}### Instruction:\n{SP}Add.\n\n{SP}### Input:\n{SP}2 and 3\n\n{SP}### Response:\n{SP}")
    assert build_prompt("Add 2 and 3.", "", "paper_eval") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
        f"{SP}### Instruction:\n{SP}Add 2 and 3.\n\n{SP}### Response:\n{SP}")


def test_improved_keeps_the_clean_template_and_protocols_name_their_templates():
    assert build_prompt("Q?") == build_prompt("Q?", "", "clean") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nQ?\n\n### Response:\n")
    assert (protocols.PAPER.train_template, protocols.PAPER.eval_template) == ("paper_train", "paper_eval")
    assert protocols.IMPROVED.train_template == protocols.IMPROVED.eval_template == "clean"
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        build_prompt("Q?", "", "alpaca")


def test_unknown_protocol_is_named_with_the_allowed_values():
    with pytest.raises(ValueError, match="unknown protocol 'papr'; expected one of paper, improved"):
        protocols.get_protocol("papr")
    params = {**DEFAULTS, "study": "s", "models": {**DEFAULTS["models"], "teacher": "smollm2-135m-instruct",
                                                   "students": [{"name": "a", "layers": 2}]}, "protocol": "papr"}
    assert any(p.startswith("protocol: unknown protocol 'papr'") and "paper, improved" in p for p in validate(params))
    assert not validate({**params, "protocol": "paper"})


def test_single_fields_switch_under_one_canonical_name():
    switched = protocols.get_protocol("improved[train_on_inputs=true,kd_positions=paper]")
    assert switched.name == "improved[kd_positions=paper,train_on_inputs=true]"  # sorted: equal protocols, equal ids
    assert (switched.train_on_inputs, switched.kd_positions, switched.gkd_uses_tau) == (True, "paper", True)
    assert protocols.get_protocol({"name": "improved", "kd_positions": "paper", "train_on_inputs": True}) == switched
    assert protocols.get_protocol(switched.name) == switched
    # a field switched to the base's own value is no switch
    assert protocols.protocol_spec("paper", {"do_sample": True, "warmup_steps": 100}) == "paper"
    assert protocols.get_protocol("paper[warmup_steps=null,top_p=0.9]").name == "paper[top_p=0.9,warmup_steps=none]"
    assert protocols.get_protocol("paper[warmup_steps=null]").warmup_steps is None


@pytest.mark.parametrize("spec, message", [
    ("improved[foo=1]", "'foo' is not a switchable protocol field; expected one of train_on_inputs"),
    ("improved[max_new_tokens=3]", "(token budgets: evaluation.max_new_tokens)"),
    ("improved[train_on_inputs=maybe]", "train_on_inputs must be true or false, got 'maybe'"),
    ("improved[top_k=1.5]", "top_k must be an integer, got '1.5'"),
    ("improved[kd_positions=all]", "kd_positions must be one of paper, next_token, response, got 'all'"),
    ("improved[train_on_inputs]", "'train_on_inputs' in 'improved[train_on_inputs]' is not field=value"),
    ("greedy[do_sample=false]", "unknown protocol 'greedy[do_sample=false]'"),
])
def test_bad_switches_are_named(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        protocols.get_protocol(spec)


def test_a_study_file_switches_fields_and_records_the_canonical_name(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("study: s\nprotocol: {name: improved, train_on_inputs: true}\n"
                    "models: {teacher: smollm2-135m-instruct, students: [{name: a, layers: 2}]}\n")
    params = load_study(path)
    assert params["protocol"] == "improved[train_on_inputs=true]"
    assert all(r.parameters["protocol"] == "improved[train_on_inputs=true]"
               for r in study.plan(params) if "protocol" in r.parameters)
    path.write_text(path.read_text().replace("train_on_inputs: true", "train_on_input: true"))
    with pytest.raises(ParamsError, match="'train_on_input' is not a switchable protocol field"):
        load_study(path)


def test_a_switched_field_changes_training_rows(tok):
    """improved with the paper's train_on_inputs: the clean prompt, but its tokens are in the cross-entropy."""
    row = batches.tokenize_example(tok, EXAMPLE, 256, "improved[train_on_inputs=true]")
    assert row["labels"] == row["input_ids"]
    assert row["input_ids"] == batches.tokenize_example(tok, EXAMPLE, 256, "improved")["input_ids"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)


EXAMPLE = Example("x1", "gsm8k", "math", "Tom has 3 apples and buys 4 more. How many apples does he have now?", "",
                  "7", "The answer is 7.")


def test_paper_rows_train_on_inputs_and_tokenize_prompt_and_response_together(tok):
    row = batches.tokenize_example(tok, EXAMPLE, 256, "paper")
    prompt = build_prompt(EXAMPLE.instruction, "", "paper_train")
    joint = tok(prompt + EXAMPLE.rationale)["input_ids"]
    assert row["input_ids"] == joint + [tok.eos_token_id]
    assert row["labels"] == row["input_ids"]  # train_on_inputs=True: the prompt is in the cross-entropy
    assert row["prompt_len"] == len(tok(prompt)["input_ids"])
    truncated = batches.tokenize_example(tok, EXAMPLE, 20, "paper")
    assert truncated["input_ids"] == joint[:20] and truncated["labels"] == joint[:20]  # cut: no EOS


def test_improved_rows_mask_the_prompt(tok):
    row = batches.tokenize_example(tok, EXAMPLE, 256, "improved")
    n = row["prompt_len"]
    assert row["labels"] == [-100] * n + row["input_ids"][n:]
    assert row["input_ids"][-1] == tok.eos_token_id and n == len(tok(row["prompt"])["input_ids"])


@pytest.mark.parametrize("protocol", ["paper", "improved"])
def test_an_incomplete_rationale_gets_no_eos(tok, protocol):
    """seqkd: a teacher generation cut at its budget must not teach the student to stop there."""
    cut = Example(*[getattr(EXAMPLE, f) for f in ("id", "task", "domain", "instruction", "input", "answer",
                                                   "rationale")], complete=False)
    assert batches.tokenize_example(tok, cut, 256, protocol)["input_ids"][-1] != tok.eos_token_id
    assert batches.tokenize_example(tok, EXAMPLE, 256, protocol)["input_ids"][-1] == tok.eos_token_id


def test_teacher_rationales_mark_generations_cut_at_the_budget(monkeypatch, tok):
    monkeypatch.setattr(teachers, "generate", lambda *a, **k: (["done.", "cut mid"], [True, False]))
    out = teachers.teacher_rationales(None, tok, [EXAMPLE, EXAMPLE], 8)
    assert [(e.rationale, e.complete) for e in out] == [("done.", True), ("cut mid", False)]


def test_held_out_size_is_fixed_under_paper_and_leaves_a_minimum_on_tiny_sets():
    examples = [Example(str(i), "gsm8k", "math", f"q{i}", "", "1") for i in range(600)]
    train, val = batches.split_train_val(examples, 0.1, 0, protocols.PAPER.val_examples)
    assert (len(train), len(val)) == (100, 500)
    train, val = batches.split_train_val(examples[:20], 0.1, 0, 500)
    assert (len(train), len(val)) == (batches.MIN_TRAIN_EXAMPLES, 20 - batches.MIN_TRAIN_EXAMPLES)
    assert len(batches.split_train_val(examples[:20], 0.1, 0)[1]) == 2  # improved: val_fraction


def test_best_epoch_is_the_lowest_validation_loss():
    history = [{"epoch": 0, "val_loss": 0.1}, {"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 1.5},
               {"epoch": 3, "val_loss": 1.7}]
    assert training.best_epoch(history) == 2  # epoch 0 (before training) is not a candidate
    assert training.best_epoch([{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": math.nan}]) == 1


def test_paper_protocol_settings_match_the_authors_files():
    p = protocols.PAPER
    assert (p.train_on_inputs, p.warmup_steps, p.val_examples, p.best_checkpoint) == (True, 100, 500, True)
    assert (p.gkd_uses_tau, p.gkd_positions) == (False, "labels")
    assert (p.do_sample, p.temperature, p.top_k, p.top_p) == (True, 1.0, 0, 1.0)
    assert p.max_new_tokens == {"math": 256, "commonsense": 256} and p.cut_at_second_response
    # Trainer's max_grad_norm default; finetune.py eval_step=200; kd_trainer.py's prompt mask and decode/encode;
    # fp16=True on fp16 weights; eval_args.json seed 6; kd_trainer.py's pad_mask = attention mask
    assert (p.max_grad_norm, p.eval_steps, p.policy_prompt, p.policy_retokenize) == (1.0, 200, "joint", True)
    assert (p.precision, p.eval_seed, p.kd_positions) == ("fp16", 6, "paper")
    i = protocols.IMPROVED
    assert (i.train_on_inputs, i.do_sample, i.gkd_positions, i.kd_positions) == (False, False, "response", "response")
    assert (i.max_grad_norm, i.eval_steps, i.policy_prompt, i.policy_retokenize, i.precision, i.eval_seed) == (
        None, None, "prompt", False, "auto", None)


def test_the_output_is_cut_at_a_second_response_marker():
    """evaluate.py keeps output.split("### Response:")[1].strip() of prompt + generation."""
    generated = " The answer is 7.\n\n### Instruction:\nNext?\n\n### Response:\nThe answer is 9."
    prompt = build_prompt("Q?", "", "paper_eval")
    assert evaluation.cut_at_response(generated) == (prompt + generated).split("### Response:")[1].strip()
    assert evaluation.cut_at_response(generated) == "The answer is 7.\n\n### Instruction:\nNext?"
    assert evaluation.cut_at_response("no marker ") == "no marker"


class FakeModel(torch.nn.Module):
    """Records what generate receives and answers with a fixed continuation."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation, self.calls = continuation, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        tail = torch.tensor([self.continuation] * len(input_ids))
        return torch.cat([input_ids, tail], 1)


@pytest.mark.parametrize("protocol, expected, correct", [
    ("paper", {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 256}, 0),
    ("improved", {"do_sample": False, "temperature": None, "top_k": None, "top_p": None, "max_new_tokens": 32}, 3),
    # one field switched: the paper's budget and cut, greedy
    ("paper[do_sample=false]", {"do_sample": False, "temperature": None, "top_k": None, "top_p": None,
                                "max_new_tokens": 256}, 0),
])
def test_decoding_settings_passed_to_generate(monkeypatch, tok, data_dir, protocol, expected, correct):
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s))
    text = "the correct answer is\n\n### Response:\ntrue"
    model = FakeModel(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    metrics = evaluation.evaluate_tasks(model, tok, ["boolq"], data_dir=data_dir, seed=6, protocol=protocol)
    call = model.calls[0]
    assert {k: call[k] for k in expected} == expected and seeds == [6]
    assert metrics["protocol"].tolist() == [protocol]
    # boolq's fixture answers "true", which comes after the second marker: the paper cuts it away
    assert metrics["correct"].tolist() == [correct]


class BosTokenizer:
    """A tiny tokenizer that adds a BOS (like Llama 3's) when asked for special tokens."""

    BOS = 9

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if isinstance(text, list):
            encoded = [self(t, add_special_tokens)["input_ids"] for t in text]
            width = max(map(len, encoded))
            return _Enc({"input_ids": torch.tensor([[self.pad_token_id] * (width - len(e)) + e for e in encoded]),
                         "attention_mask": torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])})
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.BOS] if add_special_tokens else []) + ids}


class _Enc(dict):
    def to(self, device):
        return self


def test_bos_is_the_same_in_training_on_policy_sampling_and_evaluation(tok):
    bos_tok = BosTokenizer(tok)
    row = batches.tokenize_example(bos_tok, EXAMPLE, 256, "improved")
    assert row["input_ids"][0] == BosTokenizer.BOS
    model = FakeModel([tok.eos_token_id])
    evaluation.generate(model, bos_tok, [row["prompt"]], 4)
    assert model.calls[0]["input_ids"][0].tolist() == row["input_ids"][:row["prompt_len"]]
    config = training.TrainConfig(method="gkd", max_length=256, gkd_max_new_tokens=1)
    model.train()
    batch = training.on_policy_batch(model, bos_tok, {"prompts": [row["prompt"]], "prompt_ids": [
        row["input_ids"][:row["prompt_len"]]]}, config=config, device="cpu")
    assert batch["input_ids"][0, :row["prompt_len"]].tolist() == row["input_ids"][:row["prompt_len"]]


def test_noise_is_drawn_on_the_logits_device(monkeypatch):
    seen = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: seen.append(k["device"]) or real(*a, **k))
    logits = torch.zeros(2, 3, 5)
    noisy = teachers.teacher_signal(logits, 1.0, torch.Generator().manual_seed(0))
    assert seen == [logits.device] and noisy.std() > 0


def test_the_rationale_teacher_is_loaded_on_the_training_device(monkeypatch, tmp_path):
    """run_training loads a seqkd teacher on models.default_device(), not wherever from_pretrained puts it."""
    devices = []

    class Stop(Exception):
        pass

    def fake_load(name, adapter=None, merge_adapter=False, device=None, **kwargs):
        devices.append(device)
        raise Stop

    monkeypatch.setattr(training, "load_model", fake_load)
    monkeypatch.setattr(training, "build_training_mix", lambda *a, **k: ([EXAMPLE], type("R", (), {"removed": []})))
    monkeypatch.setattr(training, "default_device", lambda: "cuda:7")
    with pytest.raises(Stop):
        training.run_training("m", tmp_path / "run", method="seqkd", teacher="t")
    assert devices == ["cuda:7"]


def test_paper_studies_cannot_train_from_the_improved_teacher_cache():
    params = {**DEFAULTS, "study": "s", "protocol": "paper",
              "models": {**DEFAULTS["models"], "teacher": "smollm2-135m-instruct",
                         "students": [{"name": "a", "layers": 2}]},
              "teacher_cache": {**DEFAULTS["teacher_cache"], "enabled": True}}
    assert any(p.startswith("teacher_cache.enabled: the teacher cache stores improved-protocol rows")
               for p in validate(params))


# ---- gkd's on-policy batches against kd_trainer.py ------------------------------------------

SHORT = Example("x2", "gsm8k", "math", "Add 2 and 2.", "", "4", "2 + 2 = 4. The answer is 4.")


def authors_on_policy_prompt(tokenizer, example: Example, cutoff_len: int) -> list[int]:
    """finetune.py tokenize / generate_and_tokenize_prompt and kd_trainer.py generate_new_inputs, re-implemented:
    prompt_attention_mask is 1 on the first user_prompt_len tokens of the joint prompt + response tokenization,
    and masked_select keeps those tokens."""
    eos = tokenizer.eos_token_id

    def tokenize(text: str, add_eos_token: bool = True) -> list[int]:
        ids = tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"]
        if ids[-1] != eos and len(ids) < cutoff_len and add_eos_token:
            ids.append(eos)
        return ids

    prompt = build_prompt(example.instruction, example.input, "paper_train")
    joint = tokenize(prompt + example.rationale)
    user_prompt_len = len(tokenize(prompt, add_eos_token=False))
    prompt_attention_mask = [1] * user_prompt_len + [0] * (len(joint) - user_prompt_len)
    return [i for i, m in zip(joint, prompt_attention_mask) if m]


def on_policy(tokenizer, protocol: str, continuation: list[int], examples=(EXAMPLE, SHORT), **config):
    rows = [batches.tokenize_example(tokenizer, e, 256, protocol) for e in examples]
    model = FakeModel(continuation)
    config = training.TrainConfig(method="gkd", protocol=protocol, max_length=256, **config)
    out = training.on_policy_batch(model, tokenizer, batches.collate(rows, tokenizer.pad_token_id), config=config,
                                   device="cpu")
    return model.calls[0], out


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.mark.parametrize("protocol", ["paper", "improved"])
def test_on_policy_sampling_starts_where_the_authors_does(tok, protocol):
    """paper: the first user_prompt_len tokens of the joint tokenization, left-padded; improved: the prompt
    tokenized alone, as evaluation encodes it. Every sampling parameter is passed (no generation-config default)."""
    call, _ = on_policy(tok, protocol, [tok.eos_token_id], gkd_max_new_tokens=300)
    prompts = call["input_ids"].tolist()
    width = call["input_ids"].shape[1]
    if protocol == "paper":
        expected = [authors_on_policy_prompt(tok, e, 256) for e in (EXAMPLE, SHORT)]
    else:
        expected = [tok(build_prompt(e.instruction, e.input, "clean"))["input_ids"] for e in (EXAMPLE, SHORT)]
    assert [p[width - len(e):] for p, e in zip(prompts, expected)] == expected
    assert call["input_ids"][1, :width - len(expected[1])].tolist() == [tok.pad_token_id] * (width - len(expected[1]))
    # the authors' max_new_tokens = max_length - max_prompt_len (gkd_max_new_tokens=300 is larger)
    assert {k: call[k] for k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")} == {
        "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 256 - width}


@pytest.mark.embedded
def test_the_joint_prompt_ends_in_another_whitespace_token_with_smollm2(embedded_dir):
    """With SmolLM2's tokenizer the training prompt alone ends in "\\n" + 16 spaces, but inside the joint
    tokenization the last space joins the response's first word: paper samples after "\\n" + 15 spaces."""
    tokenizer = models.load_tokenizer(embedded_dir)
    alone = tokenizer(build_prompt(EXAMPLE.instruction, "", "paper_train"))["input_ids"]
    call, _ = on_policy(tokenizer, "paper", [tokenizer.eos_token_id], examples=(EXAMPLE,))
    sent = call["input_ids"][0].tolist()
    assert sent == authors_on_policy_prompt(tokenizer, EXAMPLE, 256) != alone and len(sent) == len(alone)
    assert tokenizer.convert_ids_to_tokens(sent[-1:]) == ["\u010a" + "\u0120" * 15]
    call, _ = on_policy(tokenizer, "paper[policy_prompt=prompt]", [tokenizer.eos_token_id], examples=(EXAMPLE,))
    assert call["input_ids"][0].tolist() == alone


def test_paper_decodes_and_retokenizes_the_samples_without_eos(tok):
    """kd_trainer.py: batch_decode(generated, skip_special_tokens=True), tokenizer(seqs, padding=True) on the
    left, labels = input ids with pads at -100; improved keeps the sampled tokens up to the first EOS."""
    sample = tok(" 4 apples.", add_special_tokens=False)["input_ids"]
    continuation = sample + [tok.eos_token_id, tok.eos_token_id]
    call, out = on_policy(tok, "paper", continuation)
    generated = torch.cat([call["input_ids"], torch.tensor([continuation] * 2)], 1)
    tok.padding_side = "left"
    theirs = tok(tok.batch_decode(generated, skip_special_tokens=True), return_tensors="pt", padding=True)
    labels = theirs["input_ids"].clone()
    labels[labels == tok.pad_token_id] = -100
    assert torch.equal(out["input_ids"], theirs["input_ids"]) and torch.equal(out["labels"], labels)
    assert torch.equal(out["attention_mask"], theirs["attention_mask"])
    assert not (out["input_ids"][out["attention_mask"].bool()] == tok.eos_token_id).any()
    _, kept = on_policy(tok, "improved", continuation)
    real = unpadded(kept["input_ids"], kept["attention_mask"])
    assert all(r[-len(sample) - 1:] == sample + [tok.eos_token_id] for r in real)  # one EOS, nothing after it
    assert kept["labels"][kept["response_mask"]].tolist() == (sample + [tok.eos_token_id]) * 2
