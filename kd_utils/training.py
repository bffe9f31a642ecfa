"""Fine-tuning and distillation: one training loop for sft, fkl, rkl, gkd and seqkd.

``TrainConfig.protocol`` (kd_utils.protocols) decides the points where the authors' code and
ours differ: the label mask (train_on_inputs), warmup, the held-out set, the best checkpoint and how
often it is evaluated, the KD positions, GKD's temperature and on-policy batches, gradient clipping
and precision. Shared by both: LoRA r=8 / alpha=16 on q,k,v,up,down,
batch 16, lr 3e-4. accelerate handles devices, mixed precision, gradient
accumulation and data parallelism; a checkpoint is written after every epoch
(``accelerator.save_state``, trained weights only) and a run resumes from the last complete one.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from kd_utils import losses, precision, teacher_cache as cache_store
from kd_utils.batches import (collate, epoch_batches, forward, left_pad, prompt_ids, split_train_val, to_device,
                              tokenize_example)
from kd_utils.config import TrainingConfig
from kd_utils.constants import PAPER_METHOD_NAMES, TOKEN_KD_METHODS
from kd_utils.data import DEFAULT_MIX, Example, build_training_mix, source_counts
from kd_utils.evaluation import sample_examples
from kd_utils.io import run_from_params_file, standard_json, write_atomic
from kd_utils.protocols import DEFAULT_PROTOCOL, KD_POSITIONS, Protocol, get_protocol
from kd_utils.models import build_student_dir, check_adapter_dir, default_device, load_model
from kd_utils.teachers import OnlineTeacher, check_same_tokenizer, teacher_rationales

KD_METHODS = TOKEN_KD_METHODS  # the methods below that need a teacher at every step


TrainConfig = TrainingConfig  # the name this module has always used


# ---- the loop -----------------------------------------------------------------------------

def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (token mean; 0 when none is labelled, not nan)."""
    targets = labels[:, 1:].flatten()
    summed = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100,
                                               reduction="sum")
    return summed / (targets != -100).sum().clamp(min=1)


def distill_mask(batch: dict, config: TrainConfig) -> torch.Tensor:
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


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | dict, mask: torch.Tensor, config: TrainConfig,
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


def training_loss(logits: torch.Tensor, batch: dict, teacher: torch.Tensor | dict | None, config: TrainConfig,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd) of one micro-batch: CE alone for sft / seqkd, (1 - kd_weight) * CE + kd_weight * KD else."""
    ce = lm_loss(logits, batch["labels"])
    if config.method not in KD_METHODS:
        return ce, ce, torch.zeros(())
    kd = kd_loss(logits, teacher, distill_mask(batch, config), config, vocab_size)
    loss = (1 - config.kd_weight) * ce + config.kd_weight * kd if config.kd_weight < 1 else kd
    return loss, ce, kd


@torch.no_grad()
def on_policy_batch(student, tokenizer, batch: dict, config: TrainConfig, device) -> dict:
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


def mixed_precision(config: TrainConfig) -> str:
    """accelerate's mixed_precision for the protocol's ``precision`` on this machine (``kd_utils.precision``).

    "no" (fp32), "bf16" (autocast on fp32 weights, also on a CPU with native bf16) or "fp16" (GPU only).
    """
    try:
        resolved = precision.resolve(config.rules.precision)
    except ValueError as err:
        raise ValueError(f"protocol {config.protocol!r}: {err}") from None
    return "no" if resolved == "fp32" else resolved


@torch.no_grad()
def validation_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, device) -> float:
    """Token-mean cross-entropy on the held-out rows' labelled tokens (nan when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), micro_batch_size):
        batch = to_device(collate(rows[start:start + micro_batch_size], pad_id), device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:  # a batch of prompts cut before their response has no labelled token (its mean is nan)
            total += float(lm_loss(forward(model, batch), batch["labels"])) * n
            count += n
    model.train(was_training)
    return total / count if count else math.nan


def wrap_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in config.lora_target_modules if m not in present]
    if missing:
        raise ValueError(f"lora_target_modules {missing} are not modules of this model")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _trainable_names(model) -> set[str]:
    """Each trained weight once: a tied weight (lm_head = embed_tokens) by its first name, the one safetensors keeps."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def keep_trainable_weights(models: list, weights: list[dict], _output_dir: str) -> None:
    """accelerate's save-state hook: an epoch checkpoint keeps the trained weights only (LoRA's; all of them
    without LoRA). The frozen base is rebuilt from the run's parameters on resume, so writing it every epoch
    would only cost time and disk (the whole model per epoch)."""
    for model, state in zip(models, weights):
        trainable = _trainable_names(model)
        for name in [n for n in state if n not in trainable]:
            del state[name]


def check_checkpoint_weights(model, state_dir: Path) -> None:
    """Refuse to resume from a checkpoint that lacks some of the weights this run trains (loaded non-strictly)."""
    from safetensors import safe_open

    with safe_open(str(state_dir / "model.safetensors"), framework="pt") as f:  # accelerate's name for the one model
        saved = set(f.keys())
    missing = sorted(_trainable_names(model) - saved)
    if missing:
        raise ValueError(f"checkpoint {state_dir} lacks {len(missing)} trained weights of this run (e.g. "
                         f"{missing[0]!r}): another configuration wrote it; remove {state_dir.parent.parent} "
                         "to train from the start")


def last_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """The highest complete epoch checkpoint (a ``done`` marker is written last)."""
    found = [(int(p.name.split("-")[1]), p) for p in (output_dir / "checkpoints").glob("epoch-*") if (p / "done").is_file()]
    return max(found) if found else None


def train(model, tokenizer, train_examples: list[Example], config: TrainConfig, output_dir: str | Path,
          teacher=None, teacher_tokenizer=None, val_examples: list[Example] | None = None,
          on_epoch_end: Callable[[int], None] | None = None, teacher_cache: str | Path | None = None,
          teacher_cache_expect: dict | None = None) -> dict:
    """Train ``model`` (a student or a teacher being fine-tuned) and save it in ``output_dir``.

    sft / seqkd use cross-entropy only (seqkd's examples carry the teacher's generations as
    rationales, see ``teacher_rationales``); fkl / rkl / gkd add the KD loss against ``teacher``
    as (1 - kd_weight) * CE + kd_weight * KD. fkl / rkl may instead read the teacher from
    ``teacher_cache`` (a cache directory written by ``teacher_cache.run_teacher_cache`` for these
    training examples, temperature, noise sigma and epochs; ``teacher_cache_expect``: further cache fields
    it must match, see ``teacher_cache.open_for_training``); the teacher is then not needed.
    Returns the history and final validation loss. Resumes from the last epoch checkpoint in ``output_dir``.
    """
    config.validate()
    output_dir = Path(output_dir)
    vocab_size = len(tokenizer)
    if teacher_cache is not None and teacher is not None:
        raise ValueError("pass either teacher or teacher_cache, not both")
    if config.method in KD_METHODS:
        if teacher is None and teacher_cache is None:
            raise ValueError(f"method {config.method!r} needs a teacher or a teacher_cache")
        vocab_size = check_same_tokenizer(tokenizer, teacher_tokenizer or tokenizer)
    if val_examples is None:
        train_examples, val_examples = split_train_val(train_examples, config.val_fraction, config.seed,
                                                       config.val_examples if config.val_examples is not None
                                                       else config.rules.val_examples)
    if not train_examples:
        raise ValueError("no training examples")
    source = None  # the teacher source: the online model or the cache (kd_utils.teachers)
    if teacher_cache is not None:
        source = cache_store.open_for_training(teacher_cache, tokenizer, train_examples, config.method,
                                               config.temperature, config.noise_sigma, config.max_length,
                                               config.epochs, teacher_cache_expect)
    mixed = mixed_precision(config)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # one process training twice in different precisions (a notebook, a benchmark): accelerate keeps one
        # state per process and refuses a second precision; the distributed state (PartialState) is kept
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed)
    per_step = config.micro_batch_size * accelerator.num_processes
    if config.batch_size % per_step:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size x processes "
                         f"= {config.micro_batch_size} x {accelerator.num_processes}")
    accumulation = config.batch_size // per_step  # batch_size is the effective batch on any number of processes
    accelerator.gradient_accumulation_steps = accumulation
    set_seed(config.seed)
    if config.lora:
        if mixed == "fp16":  # the authors': frozen weights in fp16 (peft keeps the LoRA weights in fp32)
            model = model.to(torch.float16)
        model = wrap_lora(model, config)
    model.train()
    train_rows = [tokenize_example(tokenizer, e, config.max_length, config.protocol) for e in train_examples]
    val_rows = [tokenize_example(tokenizer, e, config.max_length, config.protocol) for e in val_examples]
    micro_batches = math.ceil(len(train_rows) / accelerator.num_processes / config.micro_batch_size)
    if micro_batches < accumulation:
        raise ValueError(f"{len(train_rows)} training examples do not fill one batch of {config.batch_size}")
    steps_per_epoch = micro_batches // accumulation  # whole accumulation groups only: none leaks into the next epoch
    if config.max_steps:
        steps_per_epoch = min(steps_per_epoch, config.max_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    # the prepared scheduler steps once per process at every optimizer step (accelerate's convention)
    warmup = config.warmup_steps if config.warmup_steps is not None else config.rules.warmup_steps
    warmup = int(config.warmup_ratio * total_steps) if warmup is None else warmup
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    if teacher is not None:
        source = OnlineTeacher(teacher, config.noise_sigma, config.seed, accelerator.device)
    device, pad_id = accelerator.device, tokenizer.pad_token_id
    policy_rng = random.Random(config.seed + 2)

    history: list[dict] = []
    step_evals: list[dict] = []  # validation every rules.eval_steps optimizer steps: {"step", "epoch", "val_loss"}
    rules = config.rules
    start_epoch = 0
    resume = last_checkpoint(output_dir)
    if resume is not None:
        start_epoch, path = resume
        check_checkpoint_weights(model, path / "state")
        accelerator.load_state(str(path / "state"), strict=False)  # the frozen weights are not in it
        saved = json.loads((path / "trainer.json").read_text())
        history = [{key: math.nan if value is None else value for key, value in h.items()}  # NaN was saved as null
                   for h in saved["history"]]
        if source is not None:
            source.load_state(saved["teacher_source"])
        policy_rng.setstate(_as_tuple(saved["policy_rng"]))
        step_evals = [{**e, "val_loss": math.nan if e["val_loss"] is None else e["val_loss"]}
                      for e in saved.get("step_evals", [])]
        accelerator.print(f"resuming after epoch {start_epoch} from {path}")
    else:
        history.append({"epoch": 0, "step": 0, "val_loss": validation_loss(model, val_rows, config.micro_batch_size,
                                                                             pad_id, device)})
    my_rows = train_rows[accelerator.process_index::accelerator.num_processes]
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        batches = epoch_batches(my_rows, config.micro_batch_size, config.seed, epoch)[:steps_per_epoch * accumulation]
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        bar = tqdm(batches, desc=f"{config.method} epoch {epoch}/{config.epochs}", leave=False,
                   disable=not accelerator.is_local_main_process)
        for micro in bar:
            batch = to_device(collate(micro, pad_id), device)
            if config.method == "gkd" and policy_rng.random() < config.lmbda:
                batch = on_policy_batch(accelerator.unwrap_model(model), tokenizer, batch, config, device)
            with accelerator.accumulate(model):
                logits = forward(model, batch)
                target = None
                if config.method in KD_METHODS:
                    with torch.no_grad(), accelerator.autocast():  # an online teacher in the student's precision
                        target = source.targets(batch, device, epoch)
                loss, ce, kd = training_loss(logits, batch, target, config, vocab_size)
                accelerator.backward(loss)
                if accelerator.sync_gradients and rules.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), rules.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for key, value in (("loss", loss), ("ce", ce), ("kd", kd)):
                sums[key] += float(value.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if accelerator.sync_gradients:
                step += 1
                if rules.eval_steps and step % rules.eval_steps == 0:
                    step_evals.append(evaluate_step(accelerator, model, tokenizer, val_rows, config, output_dir,
                                                    step, epoch, step_evals))
        n = max(len(batches), 1)
        history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": sums["loss"] / n,
                        "ce_loss": sums["ce"] / n, "kd_loss": sums["kd"] / n,
                        "val_loss": validation_loss(model, val_rows, config.micro_batch_size, pad_id, device)})
        save_checkpoint(accelerator, model, tokenizer, output_dir, epoch, history, source, policy_rng, config,
                        step_evals)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    final = output_dir / ("adapter" if config.lora else "model")
    kept, kept_step, kept_dir = config.epochs, None, None
    if rules.best_checkpoint and rules.eval_steps:
        # the authors' Trainer: the best of the every-eval_steps evaluations; none (a short run): the final model
        scored = [(e["val_loss"], e["step"]) for e in step_evals if math.isfinite(e["val_loss"])]
        if scored:
            kept_step = min(scored)[1]
            kept = next(e["epoch"] for e in step_evals if e["step"] == kept_step)
            kept_dir = output_dir / "checkpoints" / f"step-{kept_step}" / final.name
    elif rules.best_checkpoint:
        kept = best_epoch(history)
        if kept != config.epochs:  # the epoch with the lowest validation loss
            kept_dir = output_dir / "checkpoints" / f"epoch-{kept}" / final.name
    if accelerator.is_main_process:
        if kept_dir is None:
            save_trained(accelerator.unwrap_model(model), tokenizer, final)
        else:
            copy_dir(kept_dir, final)
        for stale in (output_dir / "checkpoints").glob("step-*"):  # earlier improvements, kept for a resume
            if stale.name != f"step-{kept_step}":
                shutil.rmtree(stale, ignore_errors=True)
        write_atomic(output_dir / "history.json", standard_json(history, indent=1))
    accelerator.wait_for_everyone()
    val_loss = (next(e["val_loss"] for e in step_evals if e["step"] == kept_step) if kept_step is not None else
                next(h["val_loss"] for h in history if h["epoch"] == kept))
    return {"history": history, "step_evals": step_evals, "final_val_loss": val_loss, "kept_epoch": kept,
            "kept_step": kept_step, "saved_to": str(final), "precision": _precision_label(mixed)}


def _precision_label(mixed: str) -> str:
    return precision.describe("fp32" if mixed == "no" else mixed)


def evaluate_step(accelerator, model, tokenizer, val_rows: list[dict], config: TrainConfig, output_dir: Path,
                  step: int, epoch: int, step_evals: list[dict]) -> dict:
    """The validation loss at an optimizer step; with best_checkpoint, an improvement's weights are kept.

    Every improvement stays on disk until training ends, so a run resumed from an epoch checkpoint still
    finds the best step its history names.
    """
    val = validation_loss(model, val_rows, config.micro_batch_size, tokenizer.pad_token_id, accelerator.device)
    best = min((e["val_loss"] for e in step_evals if math.isfinite(e["val_loss"])), default=math.inf)
    if config.rules.best_checkpoint and math.isfinite(val) and val < best and accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer,
                     output_dir / "checkpoints" / f"step-{step}" / ("adapter" if config.lora else "model"))
    accelerator.wait_for_everyone()
    return {"step": step, "epoch": epoch, "val_loss": val}


def best_epoch(history: list[dict]) -> int:
    """The trained epoch with the lowest validation loss (the last one when none has a finite loss; ties: earliest).

    The authors' Trainer evaluates every eval_steps and keeps the best of those; we evaluate once per epoch.
    """
    scored = [(h["val_loss"], h["epoch"]) for h in history if h["epoch"] > 0 and math.isfinite(h["val_loss"])]
    return min(scored)[1] if scored else history[-1]["epoch"]


def copy_dir(source: Path, target: Path) -> None:
    """Copy a saved model directory into place via a temp dir and a rename."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def save_trained(model, tokenizer, target: Path) -> None:
    """The adapter (peft format) or the full model, written to a temp dir then renamed."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def save_checkpoint(accelerator, model, tokenizer, output_dir: Path, epoch: int, history: list[dict],
                    source, policy_rng: random.Random, config: TrainConfig, step_evals: list[dict]) -> None:
    """Everything needed to resume after ``epoch``; a ``done`` marker makes it complete."""
    path = output_dir / "checkpoints" / f"epoch-{epoch}"
    if accelerator.is_main_process:  # one process clears it, before any writes into it
        shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path / "state"))
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, path / ("adapter" if config.lora else "model"))
        trainer = {"history": history, "teacher_source": source.state() if source is not None else {},
                   "policy_rng": policy_rng.getstate(), "config": asdict(config), "step_evals": step_evals}
        write_atomic(path / "trainer.json", standard_json(trainer))
        (path / "done").touch()
    accelerator.wait_for_everyone()


def run_training(model: str, output_dir: str | Path, method: str = "sft", domain: str = "math",
                 student_layers: int | None = None, teacher: str | None = None, teacher_adapter: str | None = None,
                 task_aware_teacher: bool = True, n_train: int | None = None, include_mawps: bool = False,
                 data_dir: str | Path | None = None, seqkd_max_new_tokens: int = 128, teacher_cache: str | None = None,
                 mix: str = DEFAULT_MIX, **config) -> dict:
    """One stage from plain parameters (what the notebooks call): load, build the mix, train, save.

    ``student_layers`` turns ``model`` into a layer-subset student first (written next to the
    run). The teacher is ``teacher`` plus ``teacher_adapter`` (merged), or the bare base model
    when ``task_aware_teacher`` is False (the expertise ablation). ``teacher_cache`` (a directory
    from ``teacher_cache.run_teacher_cache`` with the same data parameters, seed, max_length,
    val_fraction, temperature, noise sigma and epochs) replaces the teacher for fkl / rkl, and for seqkd
    when it holds rationales made with ``seqkd_max_new_tokens``.
    """
    config = TrainConfig(method=method, **config).validate()
    from_cache = teacher_cache is not None
    if from_cache and method not in (*cache_store.SPARSE_KD_METHODS, "seqkd"):
        raise ValueError(f"method {method!r} cannot use teacher_cache: it serves fkl, rkl and seqkd"
                         + (" (gkd's on-policy batches need the online teacher)" if method == "gkd" else ""))
    needs_teacher = (method in KD_METHODS or method == "seqkd") and not from_cache
    if needs_teacher and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher (or a teacher_cache)")
    if needs_teacher and task_aware_teacher and teacher_adapter is not None:
        check_adapter_dir(teacher_adapter)
    output_dir = Path(output_dir)
    base = model
    if student_layers:
        base = str(build_student_dir(model, student_layers, output_dir.parent / f"student-{Path(model).name}-L{student_layers}"))
    mix_name = mix
    mix, report = build_training_mix(domain, data_dir, include_mawps=include_mawps, mix=mix_name)
    mix_sources = source_counts(mix)  # the whole mix, before n_train samples it
    mix = sample_examples(mix, n_train, config.seed)
    teacher_model = teacher_tok = None
    # the cache must come from this run's teacher (weights, adapter, task-awareness) and seed
    cache_expect = ({**cache_store.teacher_identity(teacher, teacher_adapter, task_aware_teacher), "seed": config.seed}
                    if from_cache and teacher is not None else None)
    if needs_teacher:
        # on the device the student trains on (a seqkd teacher generates before accelerate moves anything)
        teacher_model, teacher_tok = load_model(teacher, adapter=teacher_adapter if task_aware_teacher else None,
                                                merge_adapter=True, device=default_device(),
                                                dtype=torch.float16 if mixed_precision(config) == "fp16" else None)
    if method == "seqkd":
        mix = (cache_store.cached_rationales(teacher_cache, mix, seqkd_max_new_tokens, cache_expect) if from_cache else
               teacher_rationales(teacher_model, teacher_tok, mix, seqkd_max_new_tokens, config.micro_batch_size * 4,
                                  config.protocol, precision.resolve(config.rules.precision)))
        teacher_model = teacher_cache = None
    student, tokenizer = load_model(base)
    result = train(student, tokenizer, mix, config, output_dir, teacher=teacher_model, teacher_tokenizer=teacher_tok,
                   teacher_cache=teacher_cache, teacher_cache_expect=cache_expect)
    summary = {"base_model": base, "method": method, "domain": domain, "protocol": config.protocol, "n_train": len(mix),
               "mix": mix_name, "mix_sources": mix_sources, "decontamination_removed": len(report.removed), **result}
    write_atomic(output_dir / "train_summary.json", standard_json(summary, indent=1, default=str))
    return summary


def launch_training(num_processes: int = 1, **params) -> dict:
    """``run_training`` from a notebook, data parallel over ``num_processes`` GPUs when > 1.

    accelerate's ``notebook_launcher`` forks one process per GPU (CUDA must not be initialised
    in the kernel before); the summary is read back from what the main process wrote.
    """
    if num_processes == 1:
        return run_training(**params)
    from accelerate import notebook_launcher

    notebook_launcher(functools.partial(run_training, **params), num_processes=num_processes)
    return json.loads((Path(params["output_dir"]) / "train_summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    """Script entry point for ``accelerate launch`` (multi-GPU data parallel):

        accelerate launch --num_processes 4 -m kd_utils.training outputs/<study>/runs/<run_id>/params.json
    """
    run_from_params_file(run_training, argv, "python -m kd_utils.training")


if __name__ == "__main__":
    main()
