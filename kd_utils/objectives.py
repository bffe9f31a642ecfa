"""What one micro batch of training optimizes: the next-token cross-entropy, the KD loss over the distilled
positions, their mix, and gkd's on-policy batches (the student's own samples).

``TrainingConfig.protocol`` (kd_utils.protocols) decides where the authors' code and ours differ here: which
positions are distilled, gkd's temperature, how on-policy prompts are built and labelled.
"""

from __future__ import annotations

import torch

from kd_utils import losses
from kd_utils.batches import left_pad, prompt_ids
from kd_utils.config import TrainingConfig
from kd_utils.constants import TOKEN_KD_METHODS

KD_METHODS = TOKEN_KD_METHODS  # the methods below that need a teacher at every step


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (token mean; 0 when none is labelled, not nan)."""
    targets = labels[:, 1:].flatten()
    summed = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100,
                                               reduction="sum")
    return summed / (targets != -100).sum().clamp(min=1)


def distill_mask(batch: dict, config: TrainingConfig) -> torch.Tensor:
    """Which positions' logits are distilled.

    fkl / rkl: every attention-mask position, the last one included ("paper": kd_trainer.py passes the
    attention mask as ``pad_mask``), [B, T]; or the predictions of real next tokens ("next_token") or of
    response tokens ("response"), [B, T-1]. gkd under ``paper``: every position whose *label* is set,
    unshifted, [B, T] (kd_trainer.py masks the logits with labels != -100, the prompt included under
    train_on_inputs); otherwise the predictions of response tokens, as Agarwal et al. and TRL.
    """
    rules = config.rules
    real = batch["attention_mask"].bool()
    if config.method == "gkd":
        if rules.gkd_positions == "labels":
            return batch["labels"] != -100
        return batch["response_mask"][:, 1:] & real[:, :-1]
    positions = config.distill_positions or rules.kd_positions
    if positions == "paper":
        return real
    target = batch["response_mask"][:, 1:] if positions == "response" else real[:, 1:]
    return target & real[:, :-1]


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | dict, mask: torch.Tensor, *, config: TrainingConfig,
            vocab_size: int) -> torch.Tensor:
    """KD loss against dense teacher logits [B, T, V] or a teacher cache's sparse targets (a dict).

    The mask's width says which logits it covers: T-1 (the predictions of tokens 1..T-1) or T.
    """
    width = mask.shape[1]
    if isinstance(teacher, dict):
        return losses.sparse_kd_loss(config.method, student_logits[:, :width, :vocab_size], teacher, mask,
                                     config.temperature, config.loss_chunk_size)
    s, t = losses.align_vocab(student_logits[:, :width], teacher[:, :width], vocab_size)
    if config.method == "fkl":
        return losses.forward_kl(s, t, mask, config.temperature, chunk_size=config.loss_chunk_size)
    if config.method == "rkl":
        return losses.reverse_kl(s, t, mask, config.temperature, chunk_size=config.loss_chunk_size)
    tau = config.temperature if config.rules.gkd_uses_tau else 1.0  # the authors' GKD takes no temperature
    return losses.generalized_jsd(s, t, mask, config.beta, tau, chunk_size=config.loss_chunk_size)


def training_loss(logits: torch.Tensor, batch: dict, teacher: torch.Tensor | dict | None, *, config: TrainingConfig,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd) of one micro-batch: CE alone for sft / seqkd, (1 - kd_weight) * CE + kd_weight * KD else."""
    ce = lm_loss(logits, batch["labels"])
    if config.method not in KD_METHODS:
        return ce, ce, torch.zeros(())
    kd = kd_loss(logits, teacher, distill_mask(batch, config), config=config, vocab_size=vocab_size)
    loss = (1 - config.kd_weight) * ce + config.kd_weight * kd if config.kd_weight < 1 else kd
    return loss, ce, kd


@torch.no_grad()
def on_policy_batch(student, tokenizer, batch: dict, *, config: TrainingConfig, device) -> dict:
    """Replace the responses by the student's own samples (temperature 1, top_k 0, top_p 1), left-padded.

    The prompt is each row's first ``prompt_len`` training tokens (``policy_prompt="joint"``, the authors'
    kd_trainer.py) or the prompt tokenized alone, as at evaluation ("prompt"). At most ``max_length`` tokens
    in all, as the authors' ``max_new_tokens = max_length - max_prompt_len``. With ``policy_retokenize`` the
    samples are decoded without special tokens (EOS dropped) and tokenized again, as theirs; otherwise the
    sampled tokens are kept up to and including the first EOS.
    """
    rules = config.rules
    pad = tokenizer.pad_token_id
    rows = (batch["prompt_ids"] if rules.policy_prompt == "joint" else
            [prompt_ids(tokenizer, prompt) for prompt in batch["prompts"]])
    ids, prompt_mask = (t.to(device) for t in left_pad(rows, pad))
    width = ids.shape[1]
    was_training = student.training
    student.eval()
    # every sampling parameter explicit: generate would otherwise take the model's generation config
    out = student.generate(input_ids=ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=max(1, min(config.gkd_max_new_tokens, config.max_length - width)),
                           pad_token_id=pad)
    student.train(was_training)
    if rules.policy_retokenize:
        tokenizer.padding_side = "left"
        enc = tokenizer(tokenizer.batch_decode(out, skip_special_tokens=True), return_tensors="pt", padding=True)
        out, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()
        # where the response starts: the decoded prompt's own length in tokens
        starts = torch.tensor([len(prompt_ids(tokenizer, text))
                               for text in tokenizer.batch_decode(rows, skip_special_tokens=True)], device=device)
        position = attention.long().cumsum(-1) - 1
        response = attention & (position >= starts[:, None])
    else:
        generated = out[:, width:]
        # keep tokens up to and including the first EOS
        is_eos = (generated == tokenizer.eos_token_id).long()
        gen_mask = (is_eos.cumsum(-1) - is_eos) == 0
        attention = torch.cat([prompt_mask.bool(), gen_mask], dim=1)
        response = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), gen_mask], 1)
    # the authors label every non-pad token of an on-policy batch (kd_trainer.py); improved labels the samples only
    labelled = attention if rules.train_on_inputs else response
    labels = torch.where(labelled, out, -100)
    cut = config.max_length
    return {"input_ids": out[:, :cut], "attention_mask": attention[:, :cut].long(), "labels": labels[:, :cut],
            "response_mask": response[:, :cut], "prompts": batch["prompts"], "prompt_ids": batch["prompt_ids"]}
