"""A training run's files: epoch checkpoints (what a resume needs), the trained weights, the best epoch.

A checkpoint ``checkpoints/epoch-N`` holds accelerate's state (trained weights only, optimizer, scheduler,
random states), the trained weights in the model's own format, and ``trainer.json`` (history, the teacher
source's and gkd's random states, the config); its ``done`` marker is written last, so only a complete one
is resumed from. Directories are written beside their place and renamed in (``kd_utils.io.replace_dir``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from kd_utils.io import replace_dir, standard_json, write_atomic


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
    found = [(int(p.name.split("-")[1]), p) for p in (output_dir / "checkpoints").glob("epoch-*")
             if (p / "done").is_file()]
    return max(found) if found else None


def best_epoch(history: list[dict]) -> int:
    """The trained epoch with the lowest validation loss (the last one when none has a finite loss; ties: earliest).

    The authors' Trainer evaluates every eval_steps and keeps the best of those; we evaluate once per epoch.
    """
    scored = [(h["val_loss"], h["epoch"]) for h in history if h["epoch"] > 0 and math.isfinite(h["val_loss"])]
    return min(scored)[1] if scored else history[-1]["epoch"]


def save_trained(model, tokenizer, target: Path) -> None:
    """The adapter (peft format) or the full model with its tokenizer, in ``target`` as a whole."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_dir(target, fill)


def copy_dir(source: Path, target: Path) -> None:
    """A saved model directory copied into ``target`` as a whole."""
    replace_dir(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def save_checkpoint(accelerator, path: Path, *, model, tokenizer, weights: str, trainer: dict) -> None:
    """Everything needed to resume in ``path``: accelerate's state, the trained weights (``path / weights``)
    and ``trainer`` as ``trainer.json``; a ``done`` marker makes it complete."""
    if accelerator.is_main_process:  # one process clears it, before any writes into it
        shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path / "state"))
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, path / weights)
        write_atomic(path / "trainer.json", standard_json(trainer))
        (path / "done").touch()
    accelerator.wait_for_everyone()


def read_trainer(path: Path) -> dict:
    """A checkpoint's ``trainer.json``, with the losses written as null (NaN) back as NaN."""
    saved = json.loads((path / "trainer.json").read_text())
    saved["history"] = [{key: math.nan if value is None else value for key, value in h.items()}
                        for h in saved["history"]]
    saved["step_evals"] = [{**e, "val_loss": math.nan if e["val_loss"] is None else e["val_loss"]}
                           for e in saved.get("step_evals", [])]
    return saved


def random_state(value):
    """A ``random.Random`` state read back from JSON (lists) as the tuples ``setstate`` takes."""
    return tuple(random_state(v) for v in value) if isinstance(value, list) else value
