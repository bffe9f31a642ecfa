"""Zero-shot evaluation: batched generation with the KV cache, scoring, predictions on disk."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kd_utils.data import DataError, Example, available_tasks, load_task
from kd_utils.io import write_atomic
from kd_utils.tasks import accuracy_summary, build_prompt, extract_answer, get_task, is_correct

DEFAULT_MAX_NEW_TOKENS = {"math": 256, "commonsense": 32}  # LLM-Adapters' evaluate.py / commonsense_evaluate.py


def sample_examples(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A fixed-seed sample of ``n`` examples in their original order (all when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             min_new_tokens: int | None = None, desc: str = "generate") -> list[str]:
    """Generate continuations of ``prompts`` in left-padded batches with the KV cache.

    Prompts are sorted by length so a batch wastes little padding; outputs come back in
    input order. Greedy by default; the paper's sampling (do_sample, temperature 1, top_k 0)
    is a parameter. Generation stops at EOS (or max_new_tokens).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if do_sample else {
        "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            outputs[i] = text.strip()
    return outputs


def score(examples: list[Example], outputs: list[str]) -> list[dict]:
    """Per-example prediction records (the predictions JSONL contract)."""
    records = []
    for ex, out in zip(examples, outputs):
        pred = extract_answer(ex.task, out)
        records.append({
            "id": ex.id, "task": ex.task, "prompt": build_prompt(ex.instruction, ex.input), "output": out,
            "prediction": None if isinstance(pred, float) and math.isinf(pred) else pred,
            "answer": ex.answer, "correct": is_correct(ex.task, out, ex.answer),
        })
    return records


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_tasks(model, tokenizer, task_ids: list[str], n_per_task: int | None = None,
                   data_dir: str | Path | None = None, output_dir: str | Path | None = None,
                   batch_size: int = 16, max_new_tokens: dict[str, int] | None = None,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> pd.DataFrame:
    """Zero-shot accuracy per task with 95% Wilson intervals.

    Writes ``<output_dir>/predictions/<task>.jsonl`` per task as it finishes and
    ``<output_dir>/metrics.csv`` at the end. Tasks whose test file is unavailable (hellaswag
    offline) are skipped and listed in ``metrics.attrs["skipped"]``.
    """
    for task_id in task_ids:
        get_task(task_id)  # unknown ids fail before any work
    budgets = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
    ready, skipped = available_tasks(task_ids, data_dir)
    for task_id, why in skipped.items():
        print(f"skipping {task_id}: {why}")
    if not ready:
        raise DataError(f"none of the tasks {task_ids} has a readable test file")
    rows = []
    for task_id in tqdm(ready, desc="tasks"):
        task = get_task(task_id)
        examples = sample_examples(load_task(task_id, "test", data_dir), n_per_task, seed)
        prompts = [build_prompt(ex.instruction, ex.input) for ex in examples]
        outputs = generate(model, tokenizer, prompts, budgets[task.domain], batch_size, do_sample, temperature,
                           top_k, seed, desc=task_id)
        records = score(examples, outputs)
        if output_dir is not None:
            write_atomic(Path(output_dir) / "predictions" / f"{task_id}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        rows.append({"task": task_id, "domain": task.domain,
                     **accuracy_summary(sum(r["correct"] for r in records), len(records))})
    metrics = pd.DataFrame(rows)
    if output_dir is not None:
        write_atomic(Path(output_dir) / "metrics.csv", metrics.to_csv(index=False))
    metrics.attrs["skipped"] = skipped
    return metrics
