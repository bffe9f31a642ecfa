"""A model whose greedy output is known in advance, and values recomputed from a run's inputs.

``scripted_model_dir`` turns the tiny test model into a bigram chain: every attention and MLP
block writes zero into the residual stream, so the logits at a position depend on its token
alone, and the embeddings and output rows are set so that the prompt's last token is followed
by the tokens of a chosen text and then EOS. Whatever the prompt (it must end like the Alpaca
prompt), greedy decoding then returns that text: a notebook's scores can be checked against
answers chosen to be right or wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kd_utils import models
from kd_utils.batches import split_train_val, tokenize_example
from kd_utils.data import build_training_mix


def scripted_model_dir(base_dir: Path, target: Path, text: str, prompt_end: str) -> Path:
    """A copy of ``base_dir`` that answers ``text`` to any prompt ending in ``prompt_end``."""
    tokenizer = models.load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, tie_word_embeddings=False)
    chain = [tokenizer(prompt_end, add_special_tokens=False)["input_ids"][-1],
             *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    hidden = model.config.hidden_size
    if len(set(chain[:-1])) != len(chain) - 1 or len(chain) > hidden:
        raise ValueError(f"{text!r} needs distinct tokens, at most {hidden - 2} of them")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()  # no block changes the residual stream: hidden state = embedding
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.zero_()
        head.zero_()
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            emb[token, i] = 1.0  # one direction per chain token (RMSNorm scales it to sqrt(hidden))
            head[following, i] = 10.0  # ... which the output layer maps to the next token
    return models.save_model_dir(model, tokenizer, target)


def heldout_loss(base_model: str | Path, adapter: Path | None, rows: list[dict]) -> float:
    """Token-mean next-token cross-entropy over the rows' labelled tokens, one row at a time, in float64."""
    model = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(base_model))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logp = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].double(), -1)
            for t, target in enumerate(row["labels"][1:]):  # position t predicts token t + 1
                if target != -100:
                    total -= float(logp[t, target])
                    count += 1
    return total / count


def check_training_notebook(executed: Path, run_dir: Path, base_model: str | Path, data_dir: Path,
                            val_fraction: float, max_length: int, seed: int = 0) -> dict:
    """A finetune / distill notebook's history against losses recomputed here from its inputs: the
    held-out loss before training (the base model) and after (the saved adapter), and the history
    table the notebook displays. Returns the run's summary for further checks."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert summary["history"] == history
    mix, _ = build_training_mix(summary["domain"], data_dir)
    _, val = split_train_val(mix, val_fraction, seed)
    tokenizer = models.load_tokenizer(base_model)
    rows = [tokenize_example(tokenizer, e, max_length) for e in val]
    assert history[0]["val_loss"] == pytest.approx(heldout_loss(base_model, None, rows), rel=1e-5)
    assert history[-1]["val_loss"] == pytest.approx(heldout_loss(base_model, run_dir / "adapter", rows), rel=1e-5)
    assert history[-1]["val_loss"] != pytest.approx(history[0]["val_loss"], rel=1e-5)  # training changed the model

    notebook = nbformat.read(executed, as_version=4)
    table = next(o["data"]["text/plain"] for c in notebook.cells if "pd.DataFrame(summary[\"history\"])" in c.source
                 for o in c.get("outputs", []) if "data" in o)
    header, *lines = table.splitlines()
    shown = [dict(zip(header.split(), line.split()[1:])) for line in lines]
    assert [float(r["val_loss"]) for r in shown] == [round(h["val_loss"], 4) for h in history]
    assert [int(r["step"]) for r in shown] == [h["step"] for h in history]
    return summary
