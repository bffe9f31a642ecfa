"""Fine-tuning and distillation: one training loop for sft, fkl, rkl, gkd and seqkd.

The loop follows the paper's protocol (LLM-Adapters fine-tuning + KD_generalization):
Alpaca prompt, prompt tokens excluded from the cross-entropy, LoRA r=8 / alpha=16 on
q,k,v,up,down, batch 16, lr 3e-4. accelerate handles devices, mixed precision, gradient
accumulation and data parallelism; a checkpoint is written after every epoch
(``accelerator.save_state``) and a run resumes from the last complete one.
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
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from kd_utils import losses
from kd_utils.data import Example, build_training_mix, mix_fingerprint
from kd_utils.evaluation import generate, sample_examples, write_atomic
from kd_utils.models import build_student_dir, check_adapter_dir, load_model
from kd_utils.tasks import build_prompt

METHODS = ("sft", "fkl", "rkl", "gkd", "seqkd")
PAPER_NAMES = {"sft": "SFT", "fkl": "SeqKD", "rkl": "RevKD", "gkd": "GKD", "seqkd": "SeqKD (Kim & Rush)"}
KD_METHODS = ("fkl", "rkl", "gkd")  # methods with a token-level teacher signal
SPARSE_KD_METHODS = ("fkl", "rkl")  # those that can train from a teacher cache


def cacheable_methods(representation: str) -> tuple[str, ...]:
    """The methods a teacher cache of ``representation`` can train: rkl needs the top-k + tail partition."""
    return SPARSE_KD_METHODS if representation == "topk" else ("fkl",)


@dataclass
class TrainConfig:
    method: str = "sft"
    epochs: int = 1
    batch_size: int = 16  # effective batch (micro batch x accumulation x processes)
    micro_batch_size: int = 4
    lr: float = 3e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_length: int = 256
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    temperature: float = 1.0
    noise_sigma: float = 0.0
    kd_weight: float = 1.0  # alpha in (1 - alpha) * CE + alpha * KD
    beta: float = 0.5  # gkd's JSD mixture weight
    lmbda: float = 0.5  # gkd's probability of an on-policy batch
    gkd_max_new_tokens: int = 128
    distill_positions: str = "paper"  # "paper": every non-pad position for fkl/rkl, response for gkd; "response"
    loss_chunk_size: int | None = None  # positions per KD-loss chunk; None: ~64 MiB of fp32 per chunk buffer
    val_fraction: float = 0.1
    max_steps: int | None = None  # cap on optimizer steps per epoch (smoke runs)
    mixed_precision: str = "auto"  # "auto": bf16 on GPUs that support it, else "no"
    seed: int = 0

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field, before any work."""
        checks = [
            (self.method in METHODS, f"method={self.method!r} is not one of {', '.join(METHODS)}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.noise_sigma >= 0, f"noise_sigma must be >= 0, got {self.noise_sigma}"),
            (0 <= self.beta <= 1, f"beta must be in [0, 1], got {self.beta}"),
            (0 <= self.lmbda <= 1, f"lmbda must be in [0, 1], got {self.lmbda}"),
            (0 <= self.kd_weight <= 1, f"kd_weight must be in [0, 1], got {self.kd_weight}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
             f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"),
            (self.distill_positions in ("paper", "response"),
             f"distill_positions must be 'paper' or 'response', got {self.distill_positions!r}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


# ---- data -------------------------------------------------------------------------------

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


# ---- teacher ----------------------------------------------------------------------------

def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> int:
    """Teacher and student must share a vocabulary; returns its size (embedding rows beyond it are padding)."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s, only_t = len(s_vocab.keys() - t_vocab.keys()), len(t_vocab.keys() - s_vocab.keys())
        raise ValueError(f"teacher and student tokenizers differ (student {len(s_vocab)} tokens, teacher "
                         f"{len(t_vocab)}; {only_s} only in the student, {only_t} only in the teacher, or ids "
                         "differ). KD needs a shared tokenizer: pick models of the same family.")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student_tokenizer, name) != getattr(teacher_tokenizer, name):
            raise ValueError(f"teacher and student tokenizers differ in {name}")
    return len(s_vocab)


def teacher_signal(teacher_logits: torch.Tensor, noise_sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """The teacher's logits, with fresh Gaussian noise of std ``noise_sigma`` (the noise ablation)."""
    if noise_sigma == 0:
        return teacher_logits
    noise = torch.randn(teacher_logits.shape, generator=generator, device="cpu").to(teacher_logits)
    return teacher_logits + noise_sigma * noise


# ---- the loop -----------------------------------------------------------------------------

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (on-policy batches are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (token mean)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def distill_mask(batch: dict, config: TrainConfig) -> torch.Tensor:
    """Which next-token predictions are distilled: every real token (paper, fkl/rkl) or response only."""
    response_only = config.distill_positions == "response" or config.method == "gkd"
    target = batch["labels"][:, 1:] != -100 if response_only else batch["attention_mask"][:, 1:].bool()
    return target & batch["attention_mask"][:, :-1].bool()


# (method, kind of cached teacher) -> the sparse loss: top-k + tail log-probs, or weighted draws
# (teacher_cache's "sampled" and "topk_sampled"); rkl needs the top-k + tail partition
SPARSE_LOSSES = {("fkl", "topk"): losses.forward_kl_topk, ("rkl", "topk"): losses.reverse_kl_topk,
                 ("fkl", "sampled"): losses.forward_kl_sampled}


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | dict, mask: torch.Tensor, config: TrainConfig,
            vocab_size: int) -> torch.Tensor:
    """KD loss against dense teacher logits [B, T, V] or a teacher cache's sparse batch (``TeacherCache.batch``)."""
    if isinstance(teacher, dict):
        representation = "topk" if "topk_ids" in teacher else "sampled"
        return SPARSE_LOSSES[config.method, representation](
            student_logits[:, :-1, :vocab_size], **teacher, mask=mask, temperature=config.temperature,
            chunk_size=config.loss_chunk_size)
    s, t = losses.align_vocab(student_logits[:, :-1], teacher[:, :-1], vocab_size)
    if config.method == "fkl":
        return losses.forward_kl(s, t, mask, config.temperature, chunk_size=config.loss_chunk_size)
    if config.method == "rkl":
        return losses.reverse_kl(s, t, mask, config.temperature, chunk_size=config.loss_chunk_size)
    return losses.generalized_jsd(s, t, mask, config.beta, config.temperature, chunk_size=config.loss_chunk_size)


@torch.no_grad()
def on_policy_batch(student, tokenizer, prompts: list[str], config: TrainConfig, device) -> dict:
    """Replace the responses by the student's own samples (temperature 1, top_k 0), left-padded."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    was_training = student.training
    student.eval()
    out = student.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=config.gkd_max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id)
    student.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    generated = out[:, prompt_len:]
    # keep tokens up to and including the first EOS
    after_eos = (generated == tokenizer.eos_token_id).long().cumsum(-1) - (generated == tokenizer.eos_token_id).long()
    gen_mask = after_eos == 0
    attention = torch.cat([enc["attention_mask"].bool(), gen_mask], dim=1)
    labels = torch.where(torch.cat([torch.zeros_like(enc["input_ids"], dtype=torch.bool), gen_mask], 1), out, -100)
    return {"input_ids": out[:, :config.max_length], "attention_mask": attention[:, :config.max_length].long(),
            "labels": labels[:, :config.max_length], "prompts": prompts}


def forward(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids(batch["attention_mask"])).logits


@torch.no_grad()
def validation_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, device) -> float:
    """Token-mean cross-entropy on the held-out rows' labelled tokens (nan when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), micro_batch_size):
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in collate(rows[start:start + micro_batch_size], pad_id).items()}
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


def last_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """The highest complete epoch checkpoint (a ``done`` marker is written last)."""
    found = [(int(p.name.split("-")[1]), p) for p in (output_dir / "checkpoints").glob("epoch-*") if (p / "done").is_file()]
    return max(found) if found else None


def open_teacher_cache(path: str | Path, tokenizer, train_examples: list[Example], config: TrainConfig):
    """The cache at ``path`` after checking that it fits this run (ValueError naming each differing field)."""
    from kd_utils import teacher_cache

    if config.method not in SPARSE_KD_METHODS:
        why = ("gkd's on-policy batches need the online teacher: pass teacher instead of teacher_cache"
               if config.method == "gkd" else "a teacher cache serves fkl and rkl only")
        raise ValueError(f"method {config.method!r} cannot train from teacher_cache: {why}")
    cache = teacher_cache.open_cache(path, expect={
        "tokenizer": teacher_cache.tokenizer_fingerprint(tokenizer), "temperature": config.temperature,
        "noise_sigma": config.noise_sigma, "mix_fingerprint": mix_fingerprint(train_examples),
        "max_length": config.max_length})
    if config.method not in cacheable_methods(cache.representation):
        raise ValueError(f"method {config.method!r} needs a 'topk' teacher cache (the top-k + tail partition); "
                         f"{path} holds representation {cache.representation!r}")
    return cache


def train(model, tokenizer, train_examples: list[Example], config: TrainConfig, output_dir: str | Path,
          teacher=None, teacher_tokenizer=None, val_examples: list[Example] | None = None,
          on_epoch_end: Callable[[int], None] | None = None, teacher_cache: str | Path | None = None) -> dict:
    """Train ``model`` (a student or a teacher being fine-tuned) and save it in ``output_dir``.

    sft / seqkd use cross-entropy only (seqkd's examples carry the teacher's generations as
    rationales, see ``teacher_rationales``); fkl / rkl / gkd add the KD loss against ``teacher``
    as (1 - kd_weight) * CE + kd_weight * KD. fkl / rkl may instead read the teacher from
    ``teacher_cache`` (a cache directory written by ``teacher_cache.run_teacher_cache`` for these
    training examples, temperature and noise sigma); the teacher is then not needed.
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
        train_examples, val_examples = split_train_val(train_examples, config.val_fraction, config.seed)
    if not train_examples:
        raise ValueError("no training examples")
    cache = open_teacher_cache(teacher_cache, tokenizer, train_examples, config) if teacher_cache is not None else None
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    per_step = config.micro_batch_size * accelerator.num_processes
    if config.batch_size % per_step:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size x processes "
                         f"= {config.micro_batch_size} x {accelerator.num_processes}")
    accumulation = config.batch_size // per_step  # batch_size is the effective batch on any number of processes
    accelerator.gradient_accumulation_steps = accumulation
    set_seed(config.seed)
    if config.lora:
        model = wrap_lora(model, config)
    model.train()
    train_rows = [tokenize_example(tokenizer, e, config.max_length) for e in train_examples]
    val_rows = [tokenize_example(tokenizer, e, config.max_length) for e in val_examples]
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
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * total_steps) * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
    device, pad_id = accelerator.device, tokenizer.pad_token_id
    noise_gen = torch.Generator().manual_seed(config.seed + 1)
    policy_rng = random.Random(config.seed + 2)

    history: list[dict] = []
    start_epoch = 0
    resume = last_checkpoint(output_dir)
    if resume is not None:
        start_epoch, path = resume
        accelerator.load_state(str(path / "state"))
        saved = json.loads((path / "trainer.json").read_text())
        history = saved["history"]
        noise_gen.set_state(torch.tensor(saved["noise_gen"], dtype=torch.uint8))
        policy_rng.setstate(_as_tuple(saved["policy_rng"]))
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
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(micro, pad_id).items()}
            if config.method == "gkd" and policy_rng.random() < config.lmbda:
                batch = on_policy_batch(accelerator.unwrap_model(model), tokenizer, batch["prompts"], config, device)
            with accelerator.accumulate(model):
                logits = forward(model, batch)
                ce = lm_loss(logits, batch["labels"])
                loss, kd = ce, torch.zeros(())
                if config.method in KD_METHODS:
                    with torch.no_grad():
                        target = (cache.batch(batch, device) if cache is not None
                                  else teacher_signal(forward(teacher, batch), config.noise_sigma, noise_gen))
                    kd = kd_loss(logits, target, distill_mask(batch, config), config, vocab_size)
                    loss = (1 - config.kd_weight) * ce + config.kd_weight * kd if config.kd_weight < 1 else kd
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for key, value in (("loss", loss), ("ce", ce), ("kd", kd)):
                sums[key] += float(value.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if accelerator.sync_gradients:
                step += 1
        n = max(len(batches), 1)
        history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": sums["loss"] / n,
                        "ce_loss": sums["ce"] / n, "kd_loss": sums["kd"] / n,
                        "val_loss": validation_loss(model, val_rows, config.micro_batch_size, pad_id, device)})
        save_checkpoint(accelerator, model, tokenizer, output_dir, epoch, history, noise_gen, policy_rng, config)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    final = output_dir / ("adapter" if config.lora else "model")
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, final)
        write_atomic(output_dir / "history.json", json.dumps(history, indent=1))
    accelerator.wait_for_everyone()
    return {"history": history, "final_val_loss": history[-1]["val_loss"], "saved_to": str(final)}


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
                    noise_gen: torch.Generator, policy_rng: random.Random, config: TrainConfig) -> None:
    """Everything needed to resume after ``epoch``; a ``done`` marker makes it complete."""
    path = output_dir / "checkpoints" / f"epoch-{epoch}"
    if accelerator.is_main_process:  # one process clears it, before any writes into it
        shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path / "state"))
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, path / ("adapter" if config.lora else "model"))
        trainer = {"history": history, "noise_gen": noise_gen.get_state().tolist(),
                   "policy_rng": policy_rng.getstate(), "config": asdict(config)}
        write_atomic(path / "trainer.json", json.dumps(trainer))
        (path / "done").touch()
    accelerator.wait_for_everyone()


def teacher_rationales(teacher, tokenizer, examples: list[Example], max_new_tokens: int = 256,
                       batch_size: int = 16) -> list[Example]:
    """seqkd's training set: the same prompts with the teacher's greedy generations as rationales."""
    prompts = [build_prompt(e.instruction, e.input) for e in examples]
    outputs = generate(teacher, tokenizer, prompts, max_new_tokens, batch_size, desc="teacher rationales")
    return [Example(e.id, e.task, e.domain, e.instruction, e.input, e.answer, out) for e, out in zip(examples, outputs)]


def cached_rationales(path: str | Path, examples: list[Example], max_new_tokens: int) -> list[Example]:
    """seqkd's training set from the rationales stored in a teacher cache (same contract as teacher_rationales)."""
    from kd_utils import teacher_cache

    cache = teacher_cache.open_cache(path)
    record = cache.manifest.get("rationales") or {}
    differences = teacher_cache.field_differences(
        {"max_new_tokens": record.get("max_new_tokens"), "mix_fingerprint": record.get("mix_fingerprint")},
        {"max_new_tokens": max_new_tokens, "mix_fingerprint": mix_fingerprint(examples)})
    if differences:
        raise ValueError(f"the rationales in teacher cache {path} do not fit this run: " + "; ".join(differences))
    texts = cache.rationales()
    return [Example(e.id, e.task, e.domain, e.instruction, e.input, e.answer, texts[e.id]) for e in examples]


def run_training(model: str, output_dir: str | Path, method: str = "sft", domain: str = "math",
                 student_layers: int | None = None, teacher: str | None = None, teacher_adapter: str | None = None,
                 task_aware_teacher: bool = True, n_train: int | None = None, include_mawps: bool = False,
                 data_dir: str | Path | None = None, seqkd_max_new_tokens: int = 128, teacher_cache: str | None = None,
                 **config) -> dict:
    """One stage from plain parameters (what the notebooks call): load, build the mix, train, save.

    ``student_layers`` turns ``model`` into a layer-subset student first (written next to the
    run). The teacher is ``teacher`` plus ``teacher_adapter`` (merged), or the bare base model
    when ``task_aware_teacher`` is False (the expertise ablation). ``teacher_cache`` (a directory
    from ``teacher_cache.run_teacher_cache`` with the same data parameters, seed, max_length,
    val_fraction, temperature and noise sigma) replaces the teacher for fkl / rkl, and for seqkd
    when it holds rationales made with ``seqkd_max_new_tokens``.
    """
    config = TrainConfig(method=method, **config).validate()
    from_cache = teacher_cache is not None
    if from_cache and method not in (*SPARSE_KD_METHODS, "seqkd"):
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
    mix, report = build_training_mix(domain, data_dir, include_mawps=include_mawps)
    mix = sample_examples(mix, n_train, config.seed)
    teacher_model = teacher_tok = None
    if needs_teacher:
        teacher_model, teacher_tok = load_model(teacher, adapter=teacher_adapter if task_aware_teacher else None,
                                                merge_adapter=True)
    if method == "seqkd":
        mix = (cached_rationales(teacher_cache, mix, seqkd_max_new_tokens) if from_cache else
               teacher_rationales(teacher_model, teacher_tok, mix, seqkd_max_new_tokens, config.micro_batch_size * 4))
        teacher_model = teacher_cache = None
    student, tokenizer = load_model(base)
    result = train(student, tokenizer, mix, config, output_dir, teacher=teacher_model, teacher_tokenizer=teacher_tok,
                   teacher_cache=teacher_cache)
    summary = {"base_model": base, "method": method, "domain": domain, "n_train": len(mix),
               "decontamination_removed": len(report.removed), **result}
    write_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=1, default=str))
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


def run_from_params_file(function: Callable[..., dict], argv: list[str] | None, prog: str) -> dict:
    """Call ``function(**params)`` with the arguments in a JSON / YAML file (the command-line
    entry points that ``accelerate launch`` starts on every process).

    PARAMS is a mapping of ``function``'s arguments, or a study run's ``params.json`` (its
    ``resolved`` parameters are used); ``--output-dir`` overrides the output directory.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog=prog, description=(function.__doc__ or "").split("\n\n")[0])
    parser.add_argument("params", type=Path, help=f"JSON/YAML file of {function.__name__} arguments, "
                                                  "or a run's params.json")
    parser.add_argument("--output-dir", default=None, help="override the params' output_dir")
    args = parser.parse_args(argv)
    if not args.params.is_file():
        parser.error(f"params file {args.params} does not exist")
    params = yaml.safe_load(args.params.read_text())  # YAML is a superset of JSON
    if not isinstance(params, dict):
        parser.error(f"{args.params} must hold a mapping of {function.__name__} arguments")
    params = dict(params.get("resolved", params))
    if args.output_dir:
        params["output_dir"] = args.output_dir
    if "output_dir" not in params:
        parser.error(f"{args.params} has no output_dir (or pass --output-dir)")
    return function(**params)


def main(argv: list[str] | None = None) -> None:
    """Script entry point for ``accelerate launch`` (multi-GPU data parallel):

        accelerate launch --num_processes 4 -m kd_utils.training outputs/<study>/runs/<run_id>/params.json
    """
    run_from_params_file(run_training, argv, "python -m kd_utils.training")


if __name__ == "__main__":
    main()
