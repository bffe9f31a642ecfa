"""Training rows and batches: tokenized examples, right-padded batches, splits, the model forward.

Shared by training and the teacher cache, which must see exactly the rows and positions
that a training run distills.
"""

from __future__ import annotations

import random

import torch

from kd_utils.data import Example
from kd_utils.tasks import build_prompt


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict:
    """Prompt + rationale + EOS, truncated; labels are -100 on prompt tokens (train_on_inputs=False)."""
    prompt = build_prompt(example.instruction, example.input)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.rationale or "", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels, "prompt": prompt, "id": example.id}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch with attention mask and labels (-100 on pads); ``ids`` lets a teacher cache align."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        "prompts": [r["prompt"] for r in rows],
        "ids": [r["id"] for r in rows],
    }


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (prompts and ids stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_train_val(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed-seed held-out split (at least one validation example when val_fraction > 0)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(examples))) if val_fraction > 0 else 0
    val = {*order[:n_val]}
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def epoch_batches(rows: list[dict], micro_batch_size: int, seed: int, epoch: int) -> list[list[dict]]:
    """This epoch's micro batches: a shuffle fixed by (seed, epoch), so a resumed run sees the same order."""
    order = list(range(len(rows)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return [[rows[i] for i in order[s:s + micro_batch_size]] for s in range(0, len(order), micro_batch_size)]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (on-policy batches are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, batch: dict) -> torch.Tensor:
    """The model's logits [B, T, V] on a batch (left or right padded)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids(batch["attention_mask"])).logits
