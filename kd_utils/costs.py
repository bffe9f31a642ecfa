"""A measured cost model: how many tokens each stage of a study processes, and how long that takes here.

    python -m kd_utils.costs calibrate [--output PATH] [--rounds N]

Calibration measures tokens/s of three kinds of work on this machine's device (``cpu`` or the
CUDA device name) for layer subsets of the embedded model (so several model sizes) and a few
batch sizes: ``train`` (forward + backward of a LoRA model, non-pad tokens), ``forward``
(no-grad forward: teacher targets, the teacher cache, validation, evaluation prompts) and
``generate`` (new tokens of greedy decoding with the KV cache, all sequences of a batch
counted). It also times the fixed cost of one run as the study runner pays it: papermill
executing a notebook that imports the package and loads the model, then the HTML export. The
table is cached as JSON, one entry per device kind, at ``KD_COST_TABLE`` or
``outputs/cost_table.json``. Rates are interpolated linearly in log(parameters) and log(batch)
between measured points.

``study_work(params, runs)`` counts, independently of execution, the tokens every planned run
processes: the training rows each epoch's micro batches hold (whole accumulation groups only, as
``training.train`` drops the rest), validation passes, online-teacher forwards, gkd's on-policy
samples (the same draws as training; their length is bounded by gkd_max_new_tokens), the
teacher cache's forward, and evaluation prompts plus generated tokens (log-likelihood scoring: the
tokens of every (item, choice) request, one forward). Generated tokens are an upper bound: a batch
stops early when every sequence has ended.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kd_utils.constants import ALPHA, STAGES
from kd_utils.io import write_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("train", "forward", "generate")
TEACHER_CACHE_BATCH = 8  # teacher_cache.ipynb's batch_size (the study does not set it)


def default_table_path() -> Path:
    return Path(os.environ.get("KD_COST_TABLE", PROJECT_ROOT / "outputs" / "cost_table.json"))


def device_kind() -> str:
    """'cpu' or the CUDA device's name: cost tables are per device kind."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- the cost table -----------------------------------------------------------------------

def _interpolate(points: list[tuple[float, float]], x: float, slope_out: float) -> float:
    """log-log linear interpolation of y(x) through ``points``; beyond them y scales as x**slope_out."""
    points = sorted(points)
    lx = math.log(x)
    logs = [(math.log(px), math.log(py)) for px, py in points]
    if lx <= logs[0][0]:
        return math.exp(logs[0][1] + slope_out * (lx - logs[0][0]))
    if lx >= logs[-1][0]:
        return math.exp(logs[-1][1] + slope_out * (lx - logs[-1][0]))
    for (x0, y0), (x1, y1) in zip(logs, logs[1:]):
        if x0 <= lx <= x1:
            return math.exp(y0 + (y1 - y0) * (lx - x0) / (x1 - x0))
    raise AssertionError("unreachable")


@dataclass
class CostTable:
    """Measured tokens/s per (kind, parameters, batch) on one device kind, and the fixed cost of one run."""

    device: str
    entries: list[dict]  # {"kind", "n_params", "batch", "tokens_per_s"}
    run_overhead_s: float
    derived: bool = False  # rates derived from other measurements, not calibrated on the device
    loadavg: tuple[float, float] | None = None  # 1-minute load average when calibration started and ended

    def rate(self, kind: str, n_params: int, batch: int) -> float:
        """tokens/s, interpolated in log size then log batch.

        Outside the measured sizes the rate scales as 1/parameters (compute-bound); below the smallest measured
        batch it scales with the batch (decoding is bound by reading the weights once per step), above the largest
        it stays flat (the device is saturated).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; expected one of {', '.join(KINDS)}")
        by_batch = defaultdict(list)
        for e in self.entries:
            if e["kind"] == kind:
                by_batch[e["batch"]].append((e["n_params"], e["tokens_per_s"]))
        if not by_batch:
            raise ValueError(f"the cost table for {self.device!r} has no {kind!r} measurements")
        at_batch = [(b, _interpolate(pts, n_params, -1.0)) for b, pts in by_batch.items()]
        largest = max(b for b, _ in at_batch)
        if batch >= largest:
            return dict(at_batch)[largest]
        return _interpolate(at_batch, batch, 1.0)

    def seconds(self, kind: str, n_params: int, batch: int, tokens: float) -> float:
        return tokens / self.rate(kind, n_params, batch) if tokens else 0.0


def table_device() -> str:
    """The device kind a dry-run prices: ``KD_COST_DEVICE`` (e.g. "NVIDIA H200", to price a GPU study from a
    CPU machine) or this machine's."""
    return os.environ.get("KD_COST_DEVICE") or device_kind()


def load_table(path: str | Path | None = None, device: str | None = None) -> CostTable | None:
    """The table of ``device`` (default :func:`table_device`) from the JSON at ``path``; None when there is none."""
    path = Path(path) if path is not None else default_table_path()
    if not path.is_file():
        return None
    try:
        tables = json.loads(path.read_text())["devices"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a cost table ({err}); remake it with python -m kd_utils.costs calibrate") from None
    device = device or table_device()
    if device not in tables:
        return None
    t = tables[device]
    load = (t["loadavg_start"][0], t["loadavg_end"][0]) if "loadavg_start" in t and "loadavg_end" in t else None
    return CostTable(device, t["entries"], t["run_overhead_s"], bool(t.get("derived")), load)


def save_table(table: CostTable, path: str | Path | None = None, extra: dict | None = None) -> Path:
    """Add or replace this device kind's table in the JSON at ``path`` (other devices' tables are kept)."""
    path = Path(path) if path is not None else default_table_path()
    content = json.loads(path.read_text()) if path.is_file() else {"devices": {}}
    content["devices"][table.device] = {"entries": table.entries, "run_overhead_s": table.run_overhead_s,
                                        **(extra or {})}
    write_atomic(path, json.dumps(content, indent=1) + "\n")
    return path


# ---- counting the tokens of a planned study -------------------------------------------------

@dataclass
class Work:
    """Tokens of one kind of work in one run."""

    stage: str
    run_id: str
    kind: str
    n_params: int
    batch: int
    tokens: float


@lru_cache(maxsize=None)
def _tokenizer(model: str):
    from kd_utils.models import load_tokenizer

    return load_tokenizer(model)


@lru_cache(maxsize=None)
def model_parameters(model: str, layers: int | None = None) -> int:
    """Parameters of a model (or of its first-``layers`` subset) from its config alone, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_utils.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())  # tied embeddings are one parameter


@lru_cache(maxsize=None)
def _mix(domain: str, data_dir: str | None, include_mawps: bool):
    from kd_utils.data import build_training_mix

    return build_training_mix(domain, data_dir, include_mawps=include_mawps)[0]


def _rows(model: str, p: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the (train, validation) rows a training run sees."""
    return _rows_cached(model, p["domain"], p["data_dir"], p["include_mawps"], p["n_train"], p["seed"],
                        p["val_fraction"], p["max_length"])


@lru_cache(maxsize=None)  # every run of a seed shares its rows: tokenize them once
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


@lru_cache(maxsize=None)  # every eval run of a study scores the same examples
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


@lru_cache(maxsize=None)
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


def format_estimate(params: dict, runs: list, table: CostTable | None, table_path: Path) -> str:
    """The dry-run's cost block: tokens and (with a cost table) time per stage, and the total."""

    try:
        work = study_work(params, runs)
    except (OSError, ValueError) as err:  # e.g. a hub model's config or tokenizer not on this machine, offline
        return f"estimated cost: token counts unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    n_runs = {s: sum(r.stage == s for r in runs) for s in STAGES}
    n_runs["analysis"] = 1
    tokens: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for w in work:
        tokens[w.stage][w.kind] += w.tokens
    est = estimate(work, table, n_runs) if table else {}
    where = (f"on {table.device}" + (", a table DERIVED from other measurements, not calibrated there"
                                     if table.derived else "")) if table else "no cost table for this device"
    lines = [f"estimated cost ({where}; generated tokens are upper bounds):",
             f"  {'stage':9s} {'runs':>5s} {'train tok':>12s} {'forward tok':>12s} {'generate tok':>12s} {'time':>10s}"]
    total = 0.0
    for stage in STAGES:
        t = tokens[stage]
        secs = est.get(stage, {}).get("seconds")
        total += secs or 0.0
        lines.append(f"  {stage:9s} {n_runs[stage]:5d} {t['train']:12,.0f} {t['forward']:12,.0f} {t['generate']:12,.0f} "
                     f"{_duration(secs):>10s}")
    if table:
        lines.append(f"  {'total':9s} {sum(n_runs.values()):5d} {'':38s} {_duration(total):>10s}  (one run at a time)")
        parallel = params["execution"]["parallel"]
        if parallel > 1:
            chain = longest_chain(work, table, runs)
            wall = parallel_wall(total, chain, parallel)
            lines.append(f"  with execution.parallel = {parallel}: at least {_duration(wall)} "
                         f"(if {parallel} runs share the device without slowing one another; longest chain of "
                         f"dependent runs {_duration(chain)})")
        lines.append(f"  (cost table {table_path}; analysis counted as one run's fixed cost)")
        if table.loadavg:  # rates measured on a loaded machine hold only at that load
            lines.append(f"  (calibrated at load average {table.loadavg[0]:.1f} -> {table.loadavg[1]:.1f}; "
                         f"this machine has {os.cpu_count()} cores and load {os.getloadavg()[0]:.1f} now)")
    else:
        lines.append(f"  no times: no cost table for {table_device()!r} at {table_path}; make one with "
                     "`python -m kd_utils.costs calibrate` (about 2-5 minutes on a CPU)")
    lines.append(design_power_lines(runs, params["models"]["teacher"]))
    return "\n".join(lines)


def design_power_lines(runs: list, tokenizer_model: str, alpha: float = ALPHA) -> str:
    """What the valid procedure (``kd_utils.statistics.hypothesis_tests``) can detect with this design.

    H1 tests students: each one's mean over its KD runs (expert teacher, no noise; every teacher, method,
    temperature and seed) minus the mean of its SFT seeds, on a domain's task average. From binomial sampling
    alone (p = 0.5, the largest variance) that difference has sd 100 * sqrt(v * (1/m + 1/s)), v = mean over the
    domain's tasks of 0.25 / n_task divided by the number of tasks, m KD runs and s SFT runs per student.
    Students' true gains also differ, so the printed power for a 3-point gain is an upper bound.
    Then, per hypothesis, the smallest p-value the design allows and, where it cannot reach alpha, the
    design change that would make it testable (:func:`testability_lines`): the teachers are H2/H4/H5's
    units, the students H1's and H3's.
    """
    from kd_utils.statistics.power import GAIN_OF_INTEREST, ttest_power

    def unit(p: dict) -> tuple:  # one student of the study (its SFT runs are shared by all its teachers)
        return p["model"], p.get("student_layers"), p["domain"]

    students = [r.parameters for r in runs if r.stage == "student"]
    main = [p for p in students if p["method"] != "sft" and p.get("task_aware_teacher") and not p.get("noise_sigma")]
    units = {unit(p) for p in students}
    n_units = len(units)
    kd_per_unit = len(main) / n_units
    sft_per_unit = sum(p["method"] == "sft" for p in students) / n_units
    teachers = {unit(p): set() for p in main}
    for p in main:
        teachers[unit(p)].add((p["teacher"], p["teacher_adapter"]))
    lines = ["  design power (the analysis' valid procedure; sampling sd only, so upper bounds):"]
    if not main or not sft_per_unit:
        return "\n".join(lines + ["    H1: no KD run with an SFT baseline, nothing to test"])
    by_domain: dict[str, list[int]] = defaultdict(list)
    for _task, domain, n, _prompts in _eval_prompts_of(next(r for r in runs if r.stage == "eval"), tokenizer_model):
        by_domain[domain].append(n)
    for domain, ns in by_domain.items():
        variance = sum(0.25 / n for n in ns) / len(ns) ** 2
        sd = 100 * math.sqrt(variance * (1 / kd_per_unit + 1 / sft_per_unit))
        lines.append(f"    H1 {domain}: {n_units} students (each {kd_per_unit:g} KD - {sft_per_unit:g} SFT runs), "
                     f"{len(ns)} tasks, {sum(ns):,} examples: sd {sd:.2f} points, power "
                     f"{ttest_power(n_units, GAIN_OF_INTEREST, sd, alpha):.2f} for a {GAIN_OF_INTEREST:g}-point gain")
    lines += testability_lines(main, students, unit, alpha)
    return "\n".join(lines)


def testability_lines(main: list[dict], students: list[dict], unit, alpha: float) -> list[str]:
    """Per domain, the hypotheses this design cannot test and what would make them testable
    (:func:`kd_utils.statistics.design.design_testability`)."""
    import pandas as pd

    from kd_utils.statistics.design import design_testability

    # a teacher is its model and its fine-tuned adapter (teachers of different budgets share the model)
    pairs = pd.DataFrame([{"domain": unit(p)[2], "student": str(unit(p)),
                           "teacher": str((p["teacher"], p.get("teacher_adapter"))), "method": p["method"]}
                          for p in main])
    kd_seeds = {unit(p): set() for p in main}
    for p in main:
        kd_seeds[unit(p)].add(p.get("seed"))
    spare = {unit(p) for p in students if p["method"] == "sft" and p.get("seed") not in kd_seeds.get(unit(p), set())}
    lines = []
    for domain, dom in pairs.groupby("domain", sort=False):
        table = design_testability(dom, dom["method"].nunique(), bool(spare), alpha)
        for row in table.itertuples():
            lines.append(f"    {row.hypothesis} ({domain}): {row.units}, smallest p {row.min_pvalue:.3g}: "
                         + ("testable" if row.testable else f"NOT testable; needs {row.needs}"))
    return lines


def _eval_prompts_of(run, tokenizer_model: str) -> list[tuple[str, str, int, int]]:
    p = run.parameters
    return _eval_prompts(tuple(p["tasks"]), p["n_per_task"], p["seed"], p["data_dir"], tokenizer_model)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- calibration ----------------------------------------------------------------------------

def _timed(fn, rounds: int) -> float:
    """Median seconds of ``fn`` over ``rounds`` runs after one warm-up (CUDA synchronised)."""
    import torch

    times = []
    for i in range(rounds + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(layers: list[int], train_batches: list[int], generate_batches: list[int], seq_len: int,
              new_tokens: int, rounds: int) -> tuple[CostTable, dict]:
    """Measure the table on this device for layer subsets of the embedded model."""
    import torch

    from kd_utils import models
    from kd_utils.training import TrainConfig, wrap_lora

    device = models.default_device()
    dtype = models.default_dtype()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    base, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    total_layers = base.config.num_hidden_layers
    entries = []
    gen = torch.Generator().manual_seed(0)
    for keep in layers:
        n_params = model_parameters(models.EMBEDDED_MODEL, keep)
        net = models.make_student(base, keep) if keep < total_layers else base
        net = net.to(device=device, dtype=dtype).eval()
        for batch in train_batches:
            ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=gen).to(device)
            with torch.no_grad(), autocast:
                secs = _timed(lambda: net(input_ids=ids).logits, rounds)
            entries.append({"kind": "forward", "n_params": n_params, "batch": batch, "tokens_per_s": ids.numel() / secs})
        lora = wrap_lora(models.make_student(base, keep).to(device), TrainConfig()).train()  # fp32 weights, as training
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
        for batch in train_batches:
            ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=gen).to(device)

            def step():
                with autocast:
                    loss = torch.nn.functional.cross_entropy(lora(input_ids=ids).logits.flatten(0, 1).float(),
                                                             ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
            secs = _timed(step, rounds)
            entries.append({"kind": "train", "n_params": n_params, "batch": batch, "tokens_per_s": ids.numel() / secs})
        del lora, opt
        for batch in generate_batches:
            ids = torch.randint(0, len(tokenizer), (batch, 64), generator=gen).to(device)
            kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                      "pad_token_id": tokenizer.pad_token_id, "use_cache": True}
            with torch.no_grad():
                secs = _timed(lambda: net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), rounds)
            entries.append({"kind": "generate", "n_params": n_params, "batch": batch,
                            "tokens_per_s": batch * new_tokens / secs})
        print(f"  {keep} layers ({n_params / 1e6:.0f}M): " + ", ".join(
            f"{e['kind']}@{e['batch']} {e['tokens_per_s']:,.0f}/s" for e in entries if e["n_params"] == n_params),
            flush=True)
    overhead = run_overhead_seconds(rounds)
    return CostTable(device_kind(), entries, overhead), {"seq_len": seq_len, "new_tokens": new_tokens,
                                                        "rounds": rounds, "torch": torch.__version__}


def run_overhead_seconds(rounds: int = 1) -> float:
    """What every run of a study pays besides its tokens, as ``study.execute_run`` pays it: papermill starting a
    kernel that imports training and loads the embedded model, then the executed notebook's HTML export.
    Median seconds over ``rounds`` runs."""
    import tempfile

    import nbformat
    import papermill as pm

    from kd_utils.report import notebook_to_html

    code = ("import pandas as pd\n"
            "from kd_utils import evaluation, models, plots, teacher_cache, training\n"
            "model, tokenizer = models.load_model(models.EMBEDDED_MODEL)\n"
            "model = model.to(models.default_device())\n"
            "pd.DataFrame({'step': [1, 2], 'loss': [2.0, 1.0]}).plot(x='step', y='loss');")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Fixed cost of a run"),
                                               nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        source, executed = Path(tmp, "overhead.ipynb"), Path(tmp, "executed.ipynb")
        nbformat.write(notebook, str(source))
        for _ in range(rounds):
            start = time.perf_counter()
            pm.execute_notebook(str(source), str(executed), parameters={}, cwd=str(PROJECT_ROOT),
                                progress_bar=False, kernel_name="python3")
            notebook_to_html(executed, executed.with_suffix(".html"))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
