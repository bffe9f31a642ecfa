"""bf16 autocast vs fp32 on this CPU: the same small runs both ways (parity), and the speed of each stage.

Parity, first on the untuned embedded model (all layers): held-out loss and test answers on the same items in
fp32 and under bf16 autocast. Then, for each seed, a layer-subset student of the embedded SmolLM2-135M-Instruct is
fine-tuned (LoRA, SFT, the improved protocol) on the same sample of the commonsense mix twice, once with
``precision=fp32`` and once
with ``precision=bf16``, and each model is then
- scored on the same held-out rows by cross-entropy, always in fp32 (the training precision's effect alone);
- evaluated on the same test items of a few tasks in its own precision (what ``precision: auto`` does end to end).
Reported: per-seed held-out loss and its bf16 - fp32 difference with a t interval over seeds, beside the
seed-to-seed spread of fp32 (the noise a precision change has to beat); accuracy per variant with Wilson
intervals, the paired accuracy difference on the same items (normal interval from the discordant pairs)
and how often the two answers agree.

Speed, interleaved (the variant order alternates from round to round, one round per seed): training wall
time (``training.train``), evaluation wall time (``evaluation.evaluate_tasks``) and teacher-cache
generation (``teacher_cache.run_teacher_cache`` with the full embedded model as the teacher). The load
average is recorded before and after: the machine may be shared, so ratios are the meaningful numbers.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/precision_parity.py --seeds 3 \
        --output benchmarks/results/precision_parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy import stats

from kd_utils import batches, evaluation, models, precision, teacher_cache, training
from kd_utils.data import build_training_mix
from kd_utils.io import write_atomic
from kd_utils.tasks import wilson_interval

VARIANTS = ("fp32", "bf16")


def t_interval(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_accuracy(a: list[bool], b: list[bool]) -> dict:
    """b - a in percentage points on the same items, 95% normal interval from the discordant pairs."""
    n = len(a)
    only_b = sum(y and not x for x, y in zip(a, b))
    only_a = sum(x and not y for x, y in zip(a, b))
    diff = (only_b - only_a) / n
    se = math.sqrt(max(only_a + only_b - (only_b - only_a) ** 2 / n, 0.0)) / n
    return {"n": n, "diff_pp": 100 * diff, "low_pp": 100 * (diff - 1.96 * se), "high_pp": 100 * (diff + 1.96 * se),
            "discordant": only_a + only_b, "agreement": sum(x == y for x, y in zip(a, b)) / n}


def train_once(variant: str, seed: int, student_dir: Path, tokenizer, train_rows, held_out, task_ids, args,
               tmp: Path) -> dict:
    protocol = f"improved[precision={variant}]"
    model, _ = models.load_model(student_dir)
    config = training.TrainConfig(method="sft", epochs=1, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                                  max_length=args.max_length, seed=seed, protocol=protocol)
    start = time.perf_counter()
    # no validation passes inside train(): the held-out loss is computed once, below, in fp32
    result = training.train(model, tokenizer, train_rows, config, tmp / f"{variant}-{seed}", val_examples=[])
    train_s = time.perf_counter() - start
    trained, _ = models.load_model(student_dir, adapter=result["saved_to"])
    rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in held_out]
    loss_fp32 = training.validation_loss(trained, rows, args.batch_size, tokenizer.pad_token_id, "cpu")
    start = time.perf_counter()
    metrics = evaluation.evaluate_tasks(trained, tokenizer, task_ids, n_per_task=args.n_eval, batch_size=16,
                                        output_dir=tmp / f"eval-{variant}-{seed}", seed=0, protocol=protocol)
    eval_s = time.perf_counter() - start
    correct = {t: [r["correct"] for r in evaluation.read_predictions(
        tmp / f"eval-{variant}-{seed}" / "predictions" / f"{t}.jsonl")] for t in metrics["task"]}
    outputs = {t: [r["output"] for r in evaluation.read_predictions(
        tmp / f"eval-{variant}-{seed}" / "predictions" / f"{t}.jsonl")] for t in metrics["task"]}
    return {"variant": variant, "seed": seed, "train_s": train_s, "eval_s": eval_s, "recorded": result["precision"],
            "heldout_loss_fp32": loss_fp32,
            "eval_precision": metrics["precision"].tolist(), "correct": correct, "outputs": outputs}


def base_model_parity(base, tokenizer, held_out, task_ids, args, tmp: Path) -> dict:
    """The untuned embedded model (all 30 layers) in both precisions: held-out loss and test answers."""
    model, _ = models.load_model(base)
    rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in held_out]
    out = {}
    for variant in VARIANTS:
        with precision.autocast(variant, "cpu"):
            loss = training.validation_loss(model, rows, args.batch_size, tokenizer.pad_token_id, "cpu")
        start = time.perf_counter()
        evaluation.evaluate_tasks(model, tokenizer, task_ids, n_per_task=args.n_eval, batch_size=16,
                                  output_dir=tmp / f"base-{variant}", seed=0, protocol=f"improved[precision={variant}]")
        records = {t: evaluation.read_predictions(tmp / f"base-{variant}" / "predictions" / f"{t}.jsonl")
                   for t in task_ids if (tmp / f"base-{variant}" / "predictions" / f"{t}.jsonl").is_file()}
        out[variant] = {"heldout_loss": loss, "eval_s": time.perf_counter() - start,
                        "correct": {t: [r["correct"] for r in rs] for t, rs in records.items()},
                        "outputs": {t: [r["output"] for r in rs] for t, rs in records.items()}}
    summary = {"heldout_loss": {v: out[v]["heldout_loss"] for v in VARIANTS},
               "eval_s": {v: out[v]["eval_s"] for v in VARIANTS}, "tasks": {}}
    for t in out["fp32"]["correct"]:
        a, b = out["fp32"]["correct"][t], out["bf16"]["correct"][t]
        summary["tasks"][t] = {"fp32_accuracy": 100 * sum(a) / len(a), "bf16_accuracy": 100 * sum(b) / len(b),
                               "bf16_minus_fp32": paired_accuracy(a, b),
                               "identical_outputs": sum(x == y for x, y in zip(out["fp32"]["outputs"][t],
                                                                               out["bf16"]["outputs"][t])) / len(a)}
    return summary


def cache_once(variant: str, tokenizer_dir, args, tmp: Path, rnd: int) -> float:
    start = time.perf_counter()
    teacher_cache.run_teacher_cache(str(tokenizer_dir), tmp / f"cache-{variant}-{rnd}", domain="commonsense",
                                    n_train=args.n_cache, seed=0, max_length=args.max_length, precision=variant,
                                    batch_size=8)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds = interleaved rounds")
    parser.add_argument("--student-layers", type=int, default=12)
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--n-heldout", type=int, default=48)
    parser.add_argument("--n-eval", type=int, default=50, help="test items per task")
    parser.add_argument("--tasks", default="boolq,arc_e")
    parser.add_argument("--n-cache", type=int, default=48, help="training rows of the teacher-cache timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/precision_parity.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task_ids = args.tasks.split(",")
    base = models.embedded_model_dir()
    tokenizer = models.load_tokenizer(base)
    mix, _ = build_training_mix("commonsense")
    sample = evaluation.sample_examples(mix, args.n_train + args.n_heldout, seed=0)
    held_out, train_rows = sample[::max(1, len(sample) // args.n_heldout)][:args.n_heldout], []
    held_ids = {e.id for e in held_out}
    train_rows = [e for e in sample if e.id not in held_ids][:args.n_train]
    load = {"start": os.getloadavg()}
    runs, cache_times = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        student_dir = models.build_student_dir(base, args.student_layers, tmp / "student")
        base_parity = base_model_parity(base, tokenizer, held_out, task_ids, args, tmp)
        print(f"untuned model: {json.dumps(base_parity)}", flush=True)
        for rnd in range(args.seeds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                r = train_once(variant, rnd, student_dir, tokenizer, train_rows, held_out, task_ids, args, tmp)
                r["round"] = rnd
                runs.append(r)
                print(f"seed {rnd} {variant}: train {r['train_s']:.1f}s eval {r['eval_s']:.1f}s "
                      f"held-out loss (fp32) {r['heldout_loss_fp32']:.4f}", flush=True)
            for variant in order:
                cache_times.append({"variant": variant, "round": rnd,
                                    "seconds": cache_once(variant, base, args, tmp, rnd)})
                print(f"round {rnd} cache {variant}: {cache_times[-1]['seconds']:.1f}s", flush=True)
    load["end"] = os.getloadavg()
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    loss_diff = [b["heldout_loss_fp32"] - a["heldout_loss_fp32"] for a, b in zip(by["fp32"], by["bf16"])]
    fp32_losses = [r["heldout_loss_fp32"] for r in by["fp32"]]
    accuracy = {}
    for task in task_ids:
        if task not in by["fp32"][0]["correct"]:
            continue
        pooled = {v: [c for r in by[v] for c in r["correct"][task]] for v in VARIANTS}
        same_text = sum(x == y for a, b in zip(by["fp32"], by["bf16"]) for x, y in zip(a["outputs"][task],
                                                                                          b["outputs"][task]))
        accuracy[task] = {
            **{v: {"correct": sum(pooled[v]), "n": len(pooled[v]), "accuracy": 100 * sum(pooled[v]) / len(pooled[v]),
                   "wilson_95": [100 * x for x in wilson_interval(sum(pooled[v]), len(pooled[v]))]} for v in VARIANTS},
            "bf16_minus_fp32": paired_accuracy(pooled["fp32"], pooled["bf16"]),
            "identical_outputs": same_text / len(pooled["fp32"])}

    def ratio(key: str, rows: list[dict]) -> dict:
        per_round = [a[key] / b[key] for a, b in zip([r for r in rows if r["variant"] == "fp32"],
                                                     [r for r in rows if r["variant"] == "bf16"])]
        return {"fp32_over_bf16_per_round": per_round, "median": statistics.median(per_round)}

    speed = {"training": ratio("train_s", runs), "evaluation": ratio("eval_s", runs),
             "teacher_cache": ratio("seconds", cache_times)}
    result = {
        "benchmark": "precision_parity", "model": str(base), "student_layers": args.student_layers,
        "method": "sft", "protocol": "improved[precision=fp32|bf16]", "lora": True, "epochs": 1,
        "n_train": len(train_rows), "n_heldout": len(held_out), "tasks": task_ids, "n_eval_per_task": args.n_eval,
        "batch_size": args.batch_size, "max_length": args.max_length, "seeds": args.seeds,
        "cpu_native_bf16": precision.cpu_has_native_bf16(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "loadavg": load,
        "note": ("shared 2-core machine (other jobs running; see loadavg): absolute times are noisy, the variants are "
                 "interleaved with alternating order, ratios are per round"),
        "heldout_loss": {"fp32": fp32_losses, "bf16": [r["heldout_loss_fp32"] for r in by["bf16"]],
                         "bf16_minus_fp32": t_interval(loss_diff),
                         "fp32_seed_sd": statistics.stdev(fp32_losses) if len(fp32_losses) > 1 else math.nan},
        "accuracy": accuracy, "untuned_full_model": base_parity, "speed": speed, "cache_runs": cache_times,
        "runs": [{k: v for k, v in r.items() if k not in ("correct", "outputs")} for r in runs],
    }
    print(json.dumps({k: result[k] for k in ("heldout_loss", "accuracy", "untuned_full_model", "speed", "loadavg")},
                     indent=1))
    write_atomic(args.output, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
