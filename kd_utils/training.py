"""Fine-tuning and distillation: one training loop for sft, fkl, rkl, gkd and seqkd.

``TrainingConfig.protocol`` (kd_utils.protocols) decides the points where the authors' code and
ours differ: the label mask (train_on_inputs), warmup, the held-out set, the best checkpoint and how
often it is evaluated, the KD positions, GKD's temperature and on-policy batches, gradient clipping
and precision. Shared by both: LoRA r=8 / alpha=16 on q,k,v,up,down,
batch 16, lr 3e-4. accelerate handles devices, mixed precision, gradient
accumulation and data parallelism; a checkpoint is written after every epoch
(``accelerator.save_state``, trained weights only) and a run resumes from the last complete one.

``train`` runs in named steps: ``set_up`` (config, data split, accelerator, LoRA, optimizer, the
teacher source), ``resume`` (the last complete checkpoint, or epoch 0's validation loss), ``run_epoch``
and ``save_epoch`` per epoch, and ``finish`` (the kept weights, the history). What one micro batch
optimizes is in kd_utils.objectives; the checkpoint files in kd_utils.checkpoints.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from kd_utils import precision
from kd_utils import teacher_cache as cache_store
from kd_utils.batches import collate, epoch_batches, forward, split_train_val, to_device, tokenize_example
from kd_utils.checkpoints import (
    best_epoch,
    check_checkpoint_weights,
    copy_dir,
    keep_trainable_weights,
    last_checkpoint,
    random_state,
    read_trainer,
    save_checkpoint,
    save_trained,
)
from kd_utils.config import TrainingConfig
from kd_utils.constants import PAPER_METHOD_NAMES  # noqa: F401 (the notebooks' labels, kd_utils.training's name)
from kd_utils.data import Example, build_training_mix
from kd_utils.evaluation import sample_examples
from kd_utils.io import run_from_params_file, standard_json, write_atomic
from kd_utils.models import build_student_dir, check_adapter_dir, default_device, load_model
from kd_utils.objectives import KD_METHODS, lm_loss, on_policy_batch, training_loss
from kd_utils.seeds import ON_POLICY, stream_seed
from kd_utils.teachers import CachedTeacher, OnlineTeacher, teacher_rationales

TrainConfig = TrainingConfig  # the name this module has always used


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
def validation_loss(model, rows: list[dict], *, micro_batch_size: int, pad_id: int, device) -> float:
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


@dataclass
class TrainingRun:
    """What the steps of one training run share; ``history``, ``step_evals`` and ``step`` grow as it goes."""

    config: TrainingConfig
    output_dir: Path
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    source: Any  # the opened teacher source (kd_utils.teachers); None without a teacher
    train_rows: list[dict]  # this process's share
    val_rows: list[dict]
    steps_per_epoch: int
    accumulation: int
    vocab_size: int
    mixed: str  # accelerate's mixed_precision
    policy_rng: random.Random  # gkd: which micro batches are on-policy
    history: list[dict] = field(default_factory=list)
    step_evals: list[dict] = field(default_factory=list)  # every rules.eval_steps steps: {"step", "epoch", "val_loss"}
    step: int = 0

    @property
    def weights(self) -> str:
        """The trained weights' directory name: ``adapter`` (LoRA) or ``model``."""
        return "adapter" if self.config.lora else "model"

    def validation(self) -> float:
        return validation_loss(self.model, self.val_rows, micro_batch_size=self.config.micro_batch_size,
                               pad_id=self.tokenizer.pad_token_id, device=self.accelerator.device)


def set_up(model, tokenizer, train_examples: list[Example], config: TrainingConfig, output_dir: Path, *,
           teacher=None, val_examples: list[Example] | None = None) -> TrainingRun:
    """Everything before the first step; every check that can fail does so here, before any file is written."""
    config.validate()
    if config.method in KD_METHODS and teacher is None:
        raise ValueError(f"method {config.method!r} needs a teacher (teachers.OnlineTeacher or teachers.CachedTeacher)")
    if val_examples is None:
        train_examples, val_examples = split_train_val(train_examples, config.val_fraction, config.seed,
                                                       config.val_examples if config.val_examples is not None
                                                       else config.rules.val_examples)
    if not train_examples:
        raise ValueError("no training examples")
    mixed = mixed_precision(config)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # one process training twice in different precisions (a notebook, a benchmark): accelerate keeps one
        # state per process and refuses a second precision; the distributed state (PartialState) is kept
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed)
    source = None
    if config.method in KD_METHODS:  # the online teacher on the training device; a cache checked against this run
        source = teacher.open(tokenizer=tokenizer, train_examples=train_examples, config=config,
                              device=accelerator.device)
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
    return TrainingRun(config=config, output_dir=output_dir, accelerator=accelerator, model=model, tokenizer=tokenizer,
                       optimizer=optimizer, scheduler=scheduler, source=source,
                       train_rows=train_rows[accelerator.process_index::accelerator.num_processes], val_rows=val_rows,
                       steps_per_epoch=steps_per_epoch, accumulation=accumulation,
                       vocab_size=len(tokenizer.get_vocab()) if source is not None else len(tokenizer), mixed=mixed,
                       policy_rng=random.Random(stream_seed(config.seed, ON_POLICY)))


def resume(run: TrainingRun) -> int:
    """The last complete epoch checkpoint restored (its epoch returned); without one, epoch 0's validation loss."""
    found = last_checkpoint(run.output_dir)
    if found is None:
        run.history.append({"epoch": 0, "step": 0, "val_loss": run.validation()})
        return 0
    epoch, path = found
    check_checkpoint_weights(run.model, path / "state")
    run.accelerator.load_state(str(path / "state"), strict=False)  # the frozen weights are not in it
    saved = read_trainer(path)
    run.history, run.step_evals = saved["history"], saved["step_evals"]
    if run.source is not None:
        run.source.load_state(saved["teacher_source"])
    run.policy_rng.setstate(random_state(saved["policy_rng"]))
    run.step = epoch * run.steps_per_epoch
    run.accelerator.print(f"resuming after epoch {epoch} from {path}")
    return epoch


def run_epoch(run: TrainingRun, epoch: int) -> None:
    """One pass over this epoch's micro batches, an optimizer step per accumulation group; the epoch's mean
    losses and validation loss appended to the history."""
    config, accelerator, model = run.config, run.accelerator, run.model
    device, rules = accelerator.device, config.rules
    batches = epoch_batches(run.train_rows, config.micro_batch_size, config.seed,
                            epoch)[:run.steps_per_epoch * run.accumulation]
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    bar = tqdm(batches, desc=f"{config.method} epoch {epoch}/{config.epochs}", leave=False,
               disable=not accelerator.is_local_main_process)
    for micro in bar:
        batch = to_device(collate(micro, run.tokenizer.pad_token_id), device)
        if config.method == "gkd" and run.policy_rng.random() < config.lmbda:
            batch = on_policy_batch(accelerator.unwrap_model(model), run.tokenizer, batch, config=config, device=device)
        with accelerator.accumulate(model):
            logits = forward(model, batch)
            target = None
            if config.method in KD_METHODS:
                with torch.no_grad(), accelerator.autocast():  # an online teacher in the student's precision
                    target = run.source.targets(batch, device, epoch)
            loss, ce, kd = training_loss(logits, batch, target, config=config, vocab_size=run.vocab_size)
            accelerator.backward(loss)
            if accelerator.sync_gradients and rules.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), rules.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
        for key, value in (("loss", loss), ("ce", ce), ("kd", kd)):
            sums[key] += float(value.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if accelerator.sync_gradients:
            run.step += 1
            if rules.eval_steps and run.step % rules.eval_steps == 0:
                run.step_evals.append(evaluate_step(run, epoch))
    n = max(len(batches), 1)
    run.history.append({"epoch": epoch, "step": run.step, "lr": run.scheduler.get_last_lr()[0],
                        "train_loss": sums["loss"] / n, "ce_loss": sums["ce"] / n, "kd_loss": sums["kd"] / n,
                        "val_loss": run.validation()})


def evaluate_step(run: TrainingRun, epoch: int) -> dict:
    """The validation loss at an optimizer step; with best_checkpoint, an improvement's weights are kept.

    Every improvement stays on disk until training ends, so a run resumed from an epoch checkpoint still
    finds the best step its history names.
    """
    val = run.validation()
    best = min((e["val_loss"] for e in run.step_evals if math.isfinite(e["val_loss"])), default=math.inf)
    if run.config.rules.best_checkpoint and math.isfinite(val) and val < best and run.accelerator.is_main_process:
        save_trained(run.accelerator.unwrap_model(run.model), run.tokenizer,
                     run.output_dir / "checkpoints" / f"step-{run.step}" / run.weights)
    run.accelerator.wait_for_everyone()
    return {"step": run.step, "epoch": epoch, "val_loss": val}


def save_epoch(run: TrainingRun, epoch: int) -> None:
    """The checkpoint a resume after ``epoch`` starts from."""
    trainer = {"history": run.history, "teacher_source": run.source.state() if run.source is not None else {},
               "policy_rng": run.policy_rng.getstate(), "config": asdict(run.config), "step_evals": run.step_evals}
    save_checkpoint(run.accelerator, run.output_dir / "checkpoints" / f"epoch-{epoch}", model=run.model,
                    tokenizer=run.tokenizer, weights=run.weights, trainer=trainer)


def finish(run: TrainingRun) -> dict:
    """The kept weights (the last, or the protocol's best checkpoint) in place, the history written; the summary."""
    config, output_dir, accelerator = run.config, run.output_dir, run.accelerator
    rules = config.rules
    final = output_dir / run.weights
    kept, kept_step, kept_dir = config.epochs, None, None
    if rules.best_checkpoint and rules.eval_steps:
        # the authors' Trainer: the best of the every-eval_steps evaluations; none (a short run): the final model
        scored = [(e["val_loss"], e["step"]) for e in run.step_evals if math.isfinite(e["val_loss"])]
        if scored:
            kept_step = min(scored)[1]
            kept = next(e["epoch"] for e in run.step_evals if e["step"] == kept_step)
            kept_dir = output_dir / "checkpoints" / f"step-{kept_step}" / final.name
    elif rules.best_checkpoint:
        kept = best_epoch(run.history)
        if kept != config.epochs:  # the epoch with the lowest validation loss
            kept_dir = output_dir / "checkpoints" / f"epoch-{kept}" / final.name
    if accelerator.is_main_process:
        if kept_dir is None:
            save_trained(accelerator.unwrap_model(run.model), run.tokenizer, final)
        else:
            copy_dir(kept_dir, final)
        for stale in (output_dir / "checkpoints").glob("step-*"):  # earlier improvements, kept for a resume
            if stale.name != f"step-{kept_step}":
                shutil.rmtree(stale, ignore_errors=True)
        write_atomic(output_dir / "history.json", standard_json(run.history, indent=1))
    accelerator.wait_for_everyone()
    val_loss = (next(e["val_loss"] for e in run.step_evals if e["step"] == kept_step) if kept_step is not None else
                next(h["val_loss"] for h in run.history if h["epoch"] == kept))
    return {"history": run.history, "step_evals": run.step_evals, "final_val_loss": val_loss, "kept_epoch": kept,
            "kept_step": kept_step, "saved_to": str(final),
            "precision": precision.describe("fp32" if run.mixed == "no" else run.mixed)}


def train(model, tokenizer, train_examples: list[Example], config: TrainingConfig, output_dir: str | Path, *,
          teacher: OnlineTeacher | CachedTeacher | None = None, val_examples: list[Example] | None = None,
          on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train ``model`` (a student or a teacher being fine-tuned) and save it in ``output_dir``.

    sft / seqkd use cross-entropy only (seqkd's examples carry the teacher's generations as
    rationales, see ``teachers.teacher_rationales``); fkl / rkl / gkd add the KD loss against ``teacher``
    as (1 - kd_weight) * CE + kd_weight * KD: ``teachers.OnlineTeacher(model, tokenizer)``, or for fkl / rkl
    ``teachers.CachedTeacher(directory)`` (a cache written by ``teacher_cache.run_teacher_cache`` for these
    training examples, temperature, noise sigma and epochs). ``val_examples``: the held-out rows (None: split
    from ``train_examples`` as the config says). Returns the history and final validation loss. Resumes
    from the last epoch checkpoint in ``output_dir``.
    """
    run = set_up(model, tokenizer, train_examples, config, Path(output_dir), teacher=teacher, val_examples=val_examples)
    for epoch in range(resume(run) + 1, config.epochs + 1):
        run_epoch(run, epoch)
        save_epoch(run, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return finish(run)


def run_training(model: str, output_dir: str | Path, *, method: str = "sft", domain: str = "math",
                 student_layers: int | None = None, teacher: str | None = None, teacher_adapter: str | None = None,
                 task_aware_teacher: bool = True, data_dir: str | Path | None = None, teacher_cache: str | None = None,
                 **config) -> dict:
    """One stage from plain parameters (what the notebooks call): load, build the mix, train, save.

    ``config``: ``TrainingConfig`` fields (n_train, mix, include_mawps and seqkd_max_new_tokens among them).
    ``student_layers`` turns ``model`` into a layer-subset student first (written next to the
    run). The teacher is ``teacher`` plus ``teacher_adapter`` (merged), or the bare base model
    when ``task_aware_teacher`` is False (the expertise ablation). ``teacher_cache`` (a directory
    from ``teacher_cache.run_teacher_cache`` with the same data parameters, seed, max_length,
    val_fraction, temperature, noise sigma and epochs) replaces the teacher for fkl / rkl, and for seqkd
    when it holds rationales made with ``seqkd_max_new_tokens``.
    """
    config = TrainingConfig(method=method, **config).validate()
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
        base = str(build_student_dir(model, student_layers,
                                     output_dir.parent / f"student-{Path(model).name}-L{student_layers}"))
    mix, report = build_training_mix(domain, data_dir, include_mawps=config.include_mawps, mix=config.mix)
    mix_sources = dict(Counter(e.task for e in mix))  # the whole mix, before n_train samples it
    mix = sample_examples(mix, config.n_train, config.seed)
    source = None
    # the cache must come from this run's teacher (weights, adapter, task-awareness) and seed
    cache_expect = ({**cache_store.teacher_identity(teacher, teacher_adapter, task_aware_teacher), "seed": config.seed}
                    if from_cache and teacher is not None else None)
    if from_cache and method != "seqkd":
        source = CachedTeacher(teacher_cache, cache_expect)
    if needs_teacher:
        # on the device the student trains on (a seqkd teacher generates before accelerate moves anything)
        teacher_model, teacher_tok = load_model(teacher, adapter=teacher_adapter if task_aware_teacher else None,
                                                merge_adapter=True, device=default_device(),
                                                dtype=torch.float16 if mixed_precision(config) == "fp16" else None)
        source = OnlineTeacher(teacher_model, teacher_tok)
    if method == "seqkd":
        mix = (cache_store.cached_rationales(teacher_cache, mix, config.seqkd_max_new_tokens,
                                                  expect=cache_expect)
               if from_cache else
               teacher_rationales(source.model, source.tokenizer, mix, max_new_tokens=config.seqkd_max_new_tokens,
                                  batch_size=config.micro_batch_size * 4, protocol=config.protocol,
                                  precision=precision.resolve(config.rules.precision)))
        source = None
    student, tokenizer = load_model(base)
    result = train(student, tokenizer, mix, config, output_dir, teacher=source)
    summary = {"base_model": base, "method": method, "domain": domain, "protocol": config.protocol, "n_train": len(mix),
               "mix": config.mix, "mix_sources": mix_sources, "decontamination_removed": len(report.removed), **result}
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


_MOVED = {"distill_mask": "kd_utils.objectives", "kd_loss": "kd_utils.objectives", "METHODS": "kd_utils.constants",
          "PAPER_NAMES": "kd_utils.constants (as PAPER_METHOD_NAMES)"}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"kd_utils.training.{name} moved to {_MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
