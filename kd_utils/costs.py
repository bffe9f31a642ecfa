"""A measured cost model: how many tokens each stage of a study processes, and how long that takes here.

    python -m kd_utils.costs calibrate [--output PATH] [--rounds N]

``study_work(params, runs)`` counts, independently of execution, the tokens every planned run
processes: the training rows each epoch's micro batches hold (whole accumulation groups only, as
``training.train`` drops the rest), validation passes, online-teacher forwards, gkd's on-policy
samples (the same draws as training; their length is bounded by gkd_max_new_tokens), the
teacher cache's forward, and evaluation prompts plus generated tokens (log-likelihood scoring: the
tokens of every (item, choice) request, one forward). Generated tokens are an upper bound: a batch
stops early when every sequence has ended. :func:`estimate` prices them with the device's measured
cost table (:mod:`kd_utils.cost_table`, made by ``calibrate``); what a dry-run prints is in
:mod:`kd_utils.dry_run`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kd_utils import cache_config
from kd_utils.cost_table import (  # noqa: F401 - the table's names, importable from here as before
    KINDS,
    PROJECT_ROOT,
    CostTable,
    calibrate,
    default_table_path,
    device_kind,
    load_table,
    model_parameters,
    run_overhead_seconds,
    save_table,
    table_device,
)

TEACHER_CACHE_BATCH = cache_config.defaults()["batch_size"]  # the study does not set the cache's batch size


@dataclass
class Work:
    """Tokens of one kind of work in one run."""

    stage: str
    run_id: str
    kind: str
    n_params: int
    batch: int
    tokens: float


@cache
def _tokenizer(model: str):
    from kd_utils.models import load_tokenizer

    return load_tokenizer(model)



@cache
def _mix(domain: str, data_dir: str | None, include_mawps: bool):
    from kd_utils.data import build_training_mix

    return build_training_mix(domain, data_dir, include_mawps=include_mawps)[0]


def _rows(model: str, p: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the (train, validation) rows a training run sees."""
    return _rows_cached(model, p["domain"], p["data_dir"], p["include_mawps"], p["n_train"], p["seed"],
                        p["val_fraction"], p["max_length"])


@cache  # every run of a seed shares its rows: tokenize them once
def _rows_cached(model: str, domain: str, data_dir: str | None, include_mawps: bool, n_train: int | None, seed: int,
                 val_fraction: float, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    from kd_utils.batches import split_train_val, tokenize_example
    from kd_utils.evaluation import sample_examples

    mix = sample_examples(_mix(domain, data_dir, include_mawps), n_train, seed)
    train, val = split_train_val(mix, val_fraction, seed)
    tok = _tokenizer(model)
    return ([tokenize_example(tok, e, max_length)["input_ids"] for e in train],
            [tokenize_example(tok, e, max_length)["input_ids"] for e in val])


def training_tokens(train_rows: list[list[int]], p: dict) -> list[list[int]]:
    """Per epoch, the lengths of the micro batches' rows that ``training.train`` steps on (one process)."""
    from kd_utils.batches import epoch_batches

    accumulation = p["batch_size"] // p["micro_batch_size"]
    steps = math.ceil(len(train_rows) / p["micro_batch_size"]) // accumulation
    if p.get("max_steps"):
        steps = min(steps, p["max_steps"])
    rows = [{"input_ids": r} for r in train_rows]
    return [[sum(len(r["input_ids"]) for r in micro)
             for micro in epoch_batches(rows, p["micro_batch_size"], p["seed"], epoch)[:steps * accumulation]]
            for epoch in range(1, p["epochs"] + 1)]


def _training_work(run, p: dict, student_model: str, student_params: int, teacher_params: int | None) -> list[Work]:
    train_rows, val_rows = _rows(student_model, p)
    micro = p["micro_batch_size"]
    per_epoch = training_tokens(train_rows, p)
    val_tokens = sum(map(len, val_rows)) * (p["epochs"] + 1)  # before training and after every epoch
    work = [Work(run.stage, run.id, "forward", student_params, micro, val_tokens)]
    method = p.get("method", "sft")
    if method == "gkd":
        # the same draws as training: per micro batch, on-policy with probability lmbda
        policy = random.Random(p["seed"] + 2)
        on_policy = sum(policy.random() < p["lmbda"] for epoch in per_epoch for _ in epoch)
        generated = on_policy * micro * p["gkd_max_new_tokens"]
        work.append(Work(run.stage, run.id, "generate", student_params, micro, generated))
    train_tokens = sum(map(sum, per_epoch))
    work.append(Work(run.stage, run.id, "train", student_params, micro, train_tokens))
    if method != "sft" and "teacher_cache" not in p:
        work.append(Work(run.stage, run.id, "forward", teacher_params, micro, train_tokens))
    return work


def _eval_work(run, n_params: int, tokenizer_model: str) -> list[Work]:
    p = run.parameters
    if p.get("scoring") == "loglik":  # one forward over every (item, choice) request, nothing generated
        tokens = sum(_choice_tokens(tuple(p["tasks"]), p["n_per_task"], p["seed"], p["data_dir"], tokenizer_model))
        return [Work("eval", run.id, "forward", n_params, p["batch_size"], tokens)]
    prompt_tokens = generated = 0
    from kd_utils.protocols import get_protocol

    for _task, domain, n, prompts in _eval_prompts_of(run, tokenizer_model):
        budget = p["max_new_tokens_math"] if domain == "math" else p["max_new_tokens_commonsense"]
        if budget is None:  # the protocol's, as evaluation.evaluate_tasks does
            budget = get_protocol(p["protocol"]).max_new_tokens[domain]
        prompt_tokens += prompts
        generated += budget * n
    return [Work("eval", run.id, "forward", n_params, p["batch_size"], prompt_tokens),
            Work("eval", run.id, "generate", n_params, p["batch_size"], generated)]


@cache  # every eval run of a study scores the same examples
def _eval_prompts(tasks: tuple, n_per_task: int | None, seed: int, data_dir: str | None, tokenizer_model: str
                  ) -> list[tuple[str, str, int, int]]:
    """(task, domain, examples, prompt tokens) of each available task."""
    from kd_utils.data import available_tasks, load_task
    from kd_utils.evaluation import sample_examples
    from kd_utils.tasks import build_prompt, get_task

    ready, _ = available_tasks(list(tasks), data_dir)
    tok = _tokenizer(tokenizer_model)
    out = []
    for task_id in ready:
        examples = sample_examples(load_task(task_id, "test", data_dir), n_per_task, seed)
        out.append((task_id, get_task(task_id).domain, len(examples),
                    sum(len(tok(build_prompt(e.instruction, e.input))["input_ids"]) for e in examples)))
    return out


@cache
def _choice_tokens(tasks: tuple, n_per_task: int | None, seed: int, data_dir: str | None, tokenizer_model: str
                   ) -> list[int]:
    """Tokens of every (context, continuation) request of each available task's sample (loglik scoring)."""
    from kd_utils.choice_scoring import encode_pair, parse_item
    from kd_utils.data import available_tasks, load_task
    from kd_utils.evaluation import sample_examples

    ready, _ = available_tasks(list(tasks), data_dir)
    tok = _tokenizer(tokenizer_model)
    out = []
    for task_id in ready:
        items = [parse_item(task_id, e.instruction, e.answer)
                 for e in sample_examples(load_task(task_id, "test", data_dir), n_per_task, seed)]
        out.append(sum(sum(map(len, encode_pair(tok, c, x))) for it in items
                       for c, x in zip(it.contexts, it.continuations)))
    return out


def study_work(params: dict, runs: list, sizes_by_model: dict[str, int] | None = None,
               tokenizer_model: str | None = None) -> list[Work]:
    """Every planned run's tokens by kind (see the module docstring for what is counted).

    ``sizes_by_model`` gives parameters of models whose configs are not on this machine (e.g. the paper's hub
    ids offline); ``tokenizer_model`` counts every text with that model's tokenizer instead of each model's own.
    A run's teacher is found through its dependencies, so each of several teachers counts with its own size.
    """
    known = sizes_by_model or {}

    def size(model: str, layers: int | None = None) -> int:
        return known[model] if model in known and layers is None else model_parameters(model, layers)

    text_model = tokenizer_model or params["models"]["teacher"]
    kd = params["kd"]
    work: list[Work] = []
    sizes: dict[str, int] = {}  # teacher / student run id -> parameters of the model it trains
    teacher_of: dict[str, str] = {}  # cache run id -> its teacher run id
    for run in runs:
        p = run.parameters
        if run.stage == "teacher":
            sizes[run.id] = size(p["model"])
            work += _training_work(run, p, tokenizer_model or p["model"], sizes[run.id], None)
        elif run.stage == "cache":
            teacher_of[run.id] = run.deps[0]
            train_rows, _ = _rows(text_model, p)
            work.append(Work("cache", run.id, "forward", sizes[run.deps[0]], TEACHER_CACHE_BATCH,
                             sum(map(len, train_rows))))
        elif run.stage == "student":
            sizes[run.id] = size(p["model"], p["student_layers"])
            teacher = teacher_of.get(run.deps[0], run.deps[0]) if run.deps else None
            work += _training_work(run, {**kd, **p}, tokenizer_model or p["model"], sizes[run.id],
                                   sizes[teacher] if teacher else None)
        elif run.stage == "eval":
            n = sizes[run.deps[0]] if run.deps else size(p["model"])  # no upstream: the base model
            work += _eval_work(run, n, text_model)
    return work


def estimate(work: list[Work], table: CostTable, n_runs: dict[str, int]) -> dict[str, dict]:
    """Per stage: tokens by kind and estimated seconds (work plus the fixed cost of each run)."""
    out: dict[str, dict] = {}
    for w in work:
        stage = out.setdefault(w.stage, {"tokens": defaultdict(float), "seconds": 0.0})
        stage["tokens"][w.kind] += w.tokens
        stage["seconds"] += table.seconds(w.kind, w.n_params, w.batch, w.tokens)
    for stage, count in n_runs.items():
        out.setdefault(stage, {"tokens": defaultdict(float), "seconds": 0.0})["seconds"] += count * table.run_overhead_s
    return out


def longest_chain(work: list[Work], table: CostTable, runs: list) -> float:
    """Seconds of the longest chain of dependent runs (each run's work plus its fixed cost), analysis included:
    no number of parallel runs finishes a study sooner."""
    seconds: dict[str, float] = defaultdict(float)
    for w in work:
        seconds[w.run_id] += table.seconds(w.kind, w.n_params, w.batch, w.tokens)
    finish: dict[str, float] = {}
    for run in runs:  # plan order: dependencies first
        finish[run.id] = seconds[run.id] + table.run_overhead_s + max((finish[d] for d in run.deps), default=0.0)
    return max(finish.values(), default=0.0) + table.run_overhead_s


def parallel_wall(serial_s: float, chain_s: float, parallel: int) -> float:
    """Wall seconds of a study whose runs take ``serial_s`` one at a time, ``parallel`` at a time: the work spread
    evenly over them, but never less than the longest chain of dependent runs (a lower bound)."""
    return max(serial_s / parallel, chain_s)



def _eval_prompts_of(run, tokenizer_model: str) -> list[tuple[str, str, int, int]]:
    p = run.parameters
    return _eval_prompts(tuple(p["tasks"]), p["n_per_task"], p["seed"], p["data_dir"], tokenizer_model)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_utils.costs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="measure this device's tokens/s and cache the table")
    cal.add_argument("--output", type=Path, default=None, help="default: $KD_COST_TABLE or outputs/cost_table.json")
    cal.add_argument("--layers", type=int, nargs="+", default=[30, 15, 6], help="layer subsets of the embedded model")
    cal.add_argument("--train-batches", type=int, nargs="+", default=None)
    cal.add_argument("--generate-batches", type=int, nargs="+", default=None)
    cal.add_argument("--seq-len", type=int, default=128)
    cal.add_argument("--new-tokens", type=int, default=16)
    cal.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    train_batches = args.train_batches or ([8, 32] if gpu else [8])
    generate_batches = args.generate_batches or ([16, 64, 256] if gpu else [1, 8])
    load = os.getloadavg()
    print(f"calibrating on {device_kind()} (load {load[0]:.2f})", flush=True)
    table, info = calibrate(args.layers, train_batches, generate_batches, args.seq_len, args.new_tokens, args.rounds)
    path = save_table(table, args.output, {**info, "loadavg_start": load, "loadavg_end": os.getloadavg(),
                                           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"run overhead {table.run_overhead_s:.1f} s; wrote {path}")
    if max(load[0], os.getloadavg()[0]) > (os.cpu_count() or 1):
        print(f"warning: load average above the {os.cpu_count()} cores during calibration: other work shared them, "
              "so these rates hold only at a similar load; calibrate again on a quiet machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
