"""Zero-shot evaluation: batched generation with the KV cache, scoring, predictions on disk."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kd_utils import choice_scoring
from kd_utils import precision as precisions
from kd_utils.data import DataError, Example, available_tasks, load_task
from kd_utils.io import write_atomic
from kd_utils.protocols import DEFAULT_PROTOCOL, get_protocol
from kd_utils.tasks import RESPONSE_MARKER, accuracy_summary, build_prompt, extract_answer, get_task, is_correct


def sample_examples(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A fixed-seed sample of ``n`` examples in their original order (all when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             min_new_tokens: int | None = None, desc: str = "generate", top_p: float = 1.0,
             return_finished: bool = False, precision: str = "fp32") -> list[str] | tuple[list[str], list[bool]]:
    """Generate continuations of ``prompts`` in left-padded batches with the KV cache.

    Prompts are sorted by length so a batch wastes little padding; outputs come back in
    input order. Greedy by default; sampling (the paper: temperature 1, top_k 0, top_p 1) is
    a parameter, seeded by ``seed``. Prompts carry the tokenizer's special prefix, as in
    training (``batches.prompt_ids``). Generation stops at EOS (or max_new_tokens); with
    ``return_finished`` also whether each output ended at EOS. ``precision``: a resolved precision
    (``kd_utils.precision.resolve``), the autocast generation runs under.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    finished = [False] * len(prompts)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {
        "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        with precisions.inference_autocast(model, precision, device):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = (new == tokenizer.eos_token_id).any(-1).tolist()
        for i, text, done in zip(idx, texts, ended):
            outputs[i], finished[i] = text.strip(), bool(done)
    return (outputs, finished) if return_finished else outputs


def cut_at_response(text: str) -> str:
    """The text before a second "### Response:" (the authors' ``output.split("### Response:")[1].strip()``
    on prompt + generation, evaluate.py / commonsense_evaluate.py)."""
    return text.split(RESPONSE_MARKER, 1)[0].strip()


def score(examples: list[Example], outputs: list[str], template: str = "clean") -> list[dict]:
    """Per-example prediction records (the predictions JSONL contract)."""
    records = []
    for ex, out in zip(examples, outputs):
        pred = extract_answer(ex.task, out)
        records.append({
            "id": ex.id, "task": ex.task, "prompt": build_prompt(ex.instruction, ex.input, template), "output": out,
            "prediction": None if isinstance(pred, float) and math.isinf(pred) else pred,
            "answer": ex.answer, "correct": is_correct(ex.task, out, ex.answer),
        })
    return records


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_tasks(model, tokenizer, task_ids: list[str], *, n_per_task: int | None = None,
                   data_dir: str | Path | None = None, output_dir: str | Path | None = None,
                   batch_size: int = 16, max_new_tokens: dict[str, int | None] | None = None,
                   do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                   seed: int = 0, protocol: str = DEFAULT_PROTOCOL, scoring: str = "generate",
                   loglik_metric: str = choice_scoring.DEFAULT_METRIC) -> pd.DataFrame:
    """Zero-shot accuracy per task with 95% Wilson intervals.

    The protocol decides the prompt template, the decoding (``paper``: sampled with its ``eval_seed``,
    ``improved``: greedy), the token budget per domain and whether the output is cut at a
    second "### Response:" and the precision (``kd_utils.precision``: ``auto`` is bf16 autocast where
    the hardware has bf16; the resolved value is each row's ``precision``); ``max_new_tokens`` /
    ``do_sample`` / ``temperature`` / ``top_k`` override it where given (None: the protocol's). Writes
    ``<output_dir>/predictions/<task>.jsonl`` per task as it finishes and ``<output_dir>/metrics.csv`` at the end.
    Tasks whose test file is
    unavailable (hellaswag offline) are skipped and listed in ``metrics.attrs["skipped"]``.
    ``scoring="loglik"`` scores the answer choices of multiple-choice tasks by log-likelihood instead
    (:mod:`kd_utils.choice_scoring`; nothing is generated), ``loglik_metric`` (acc or acc_norm) deciding
    ``correct``; metrics then also carry both metrics' accuracies.
    """
    rules = get_protocol(protocol)
    if scoring not in choice_scoring.SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(choice_scoring.SCORINGS)}, got {scoring!r}")
    for task_id in task_ids:
        get_task(task_id)  # unknown ids fail before any work
        if scoring == "loglik" and task_id not in choice_scoring.CHOICE_TASKS:
            raise ValueError("scoring 'loglik' needs multiple-choice tasks "
                             f"({', '.join(choice_scoring.CHOICE_TASKS)}), "
                             f"got {task_id!r}")
    budgets = {**rules.max_new_tokens, **{k: v for k, v in (max_new_tokens or {}).items() if v is not None}}
    decoding = {"do_sample": rules.do_sample if do_sample is None else do_sample,
                "temperature": rules.temperature if temperature is None else temperature,
                "top_k": rules.top_k if top_k is None else top_k, "top_p": rules.top_p}
    precision = precisions.resolve(rules.precision, getattr(model, "device", None))  # None: the default device
    # the paper's 6; ``seed`` still picks n_per_task
    sampling_seed = seed if rules.eval_seed is None else rules.eval_seed
    ready, skipped = available_tasks(task_ids, data_dir)
    for task_id, why in skipped.items():
        print(f"skipping {task_id}: {why}")
    if not ready:
        raise DataError(f"none of the tasks {task_ids} has a readable test file")
    rows = []
    for task_id in tqdm(ready, desc="tasks"):
        task = get_task(task_id)
        examples = sample_examples(load_task(task_id, "test", data_dir), n_per_task, seed)
        extra = {}  # generated answers add no columns (results.csv reads a missing scoring as generate)
        if scoring == "loglik":
            # no autocast: bf16's parity was measured on generated answers, not on log-likelihood comparisons of
            # close choices; the weights' own dtype is what ran
            records = choice_scoring.score_examples(model, tokenizer, examples, batch_size, loglik_metric)
            extra = {"scoring": scoring, "loglik_metric": loglik_metric,
                     "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                         getattr(model, "dtype", None), "fp32"),
                     **{f"accuracy_{m}": 100.0 * sum(r[f"correct_{m}"] for r in records) / len(records)
                        for m in choice_scoring.METRICS}}
        else:
            prompts = [build_prompt(ex.instruction, ex.input, rules.eval_template) for ex in examples]
            outputs = generate(model, tokenizer, prompts, budgets[task.domain], batch_size, seed=sampling_seed,
                               desc=task_id, precision=precision, **decoding)
            if rules.cut_at_second_response:
                outputs = [cut_at_response(o) for o in outputs]
            records = score(examples, outputs, rules.eval_template)
        if output_dir is not None:
            write_atomic(Path(output_dir) / "predictions" / f"{task_id}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        rows.append({"task": task_id, "domain": task.domain,
                     **accuracy_summary(sum(r["correct"] for r in records), len(records)), "protocol": rules.name,
                     "precision": precision, **extra})
    metrics = pd.DataFrame(rows)
    if output_dir is not None:
        write_atomic(Path(output_dir) / "metrics.csv", metrics.to_csv(index=False))
    metrics.attrs["skipped"] = skipped
    return metrics
