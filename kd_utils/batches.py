"""Training rows and batches: tokenized examples, right-padded batches, splits, the model forward.

Shared by training and the teacher cache, which must see exactly the rows and positions
that a training run distills.
"""

from __future__ import annotations

import random

import torch

from kd_utils.data import Example
from kd_utils.protocols import DEFAULT_PROTOCOL, Protocol, get_protocol
from kd_utils.tasks import build_prompt


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens with the tokenizer's own special prefix (BOS for Llama 3, nothing for Qwen / SmolLM2).

    Training rows, on-policy samples and evaluation all encode prompts this way (the authors'
    ``tokenizer(prompt)`` calls do the same), so no position sees a token the others never saw.
    """
    return tokenizer(prompt)["input_ids"]


def tokenize_example(tokenizer, example: Example, max_length: int,
                     protocol: str | Protocol = DEFAULT_PROTOCOL) -> dict:
    """Prompt + rationale + EOS, truncated to ``max_length`` (a truncated row, or an incomplete rationale, gets no EOS).

    Labels are the input ids under ``train_on_inputs`` (the paper), else -100 on the prompt;
    ``prompt_len`` marks where the response starts either way. The paper tokenizes prompt and
    rationale as one string and appends EOS only when the row is shorter than max_length
    (finetune.py ``tokenize``); ``improved`` joins separately tokenized parts.
    """
    proto = get_protocol(protocol)
    prompt = build_prompt(example.instruction, example.input, proto.train_template)
    head = prompt_ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    stop = [eos] if example.complete else []
    if proto.joint_tokenization:
        ids = prompt_ids(tokenizer, prompt + (example.rationale or ""))[:max_length]
        if len(ids) < max_length and ids[-1] != eos:
            ids += stop
    else:
        response = tokenizer(example.rationale or "", add_special_tokens=False)["input_ids"] + stop
        ids = (head + response)[:max_length]
    n_prompt = min(len(head), len(ids))
    labels = list(ids) if proto.train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels, "prompt_len": n_prompt, "prompt": prompt, "id": example.id}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch with attention mask, labels (-100 on pads) and the response tokens' mask.

    ``ids`` lets a teacher cache align; ``prompt_ids`` are each row's first ``prompt_len`` tokens.
    """
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        "response_mask": torch.tensor([pad([0] * r["prompt_len"] + [1] * (len(r["input_ids"]) - r["prompt_len"]), 0)
                                       for r in rows]).bool(),
        "prompts": [r["prompt"] for r in rows],
        "prompt_ids": [r["input_ids"][:r["prompt_len"]] for r in rows],  # on-policy prompts (policy_prompt="joint")
        "ids": [r["id"] for r in rows],
    }


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (prompts and ids stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a left-padded [B, T] tensor and its attention mask (for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


MIN_TRAIN_EXAMPLES = 8  # a fixed-size hold-out never leaves fewer training examples than this


def split_train_val(examples: list[Example], val_fraction: float, seed: int,
                    val_examples: int | None = None) -> tuple[list[Example], list[Example]]:
    """A fixed-seed held-out split: ``val_examples`` examples when given, else ``val_fraction`` of them.

    A fixed size (the paper's 500) on a set too small for it keeps MIN_TRAIN_EXAMPLES for
    training and holds out the rest (at least one); at least one validation example when val_fraction > 0.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if val_examples is not None:
        n_val = min(val_examples, max(1, len(examples) - MIN_TRAIN_EXAMPLES)) if val_examples > 0 else 0
    else:
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
