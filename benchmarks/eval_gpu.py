"""Evaluation throughput at large batches: dynamic KV cache, static cache, compiled decoding, the paper's loop.

Every variant runs ``kd_utils.evaluation.generate`` unchanged on the embedded SmolLM2-135M-Instruct
(bfloat16 on GPUs that support it); a variant only sets the model's generation config, which
``model.generate`` reads:
- ``dynamic``: the default (DynamicCache);
- ``static``: ``cache_implementation="static"``, ``disable_compile=True``;
- ``compiled``: ``cache_implementation="static"`` with transformers' automatic ``torch.compile`` of the
  decoding forward (on CUDA; on CPU only with ``--compile-cpu``).
The reference is the paper's loop (batch 1, no cache, argmax of the last position; see
eval_throughput.py). Each call generates exactly ``--max-new-tokens`` per prompt (min_new_tokens), so
token counts are equal; GSM8K test prompts, batch b = the first b prompts.

Timing: one warm-up per (variant, batch) (compilation happens there and is reported separately), then
``--rounds`` interleaved rounds, variant order reversed every other round; median and spread (max - min)
of tokens/s; load average recorded. Two phases, so that a time limit cuts the uncertain part only: dynamic and
static (warm-ups, rounds) and the paper's loop first, then compiled decoding's warm-up and ``--rounds`` more rounds
over all three. The JSON is rewritten after every step (``complete`` false until the end). Check: the greedy
outputs of every variant on ``--n-check`` prompts must equal the dynamic cache's; the fastest variant with
identical outputs is kept. Full test-set time
per model: every available task in full, at most 256 (math) / 32 (commonsense) new tokens per example,
at the kept variant's rate at the largest batch (an upper bound: batches stop when every sequence ends).

    PYTHONPATH=. python benchmarks/eval_gpu.py                 # GPU: batches 64..512
    PYTHONPATH=. python benchmarks/eval_gpu.py --tiny          # CPU check: batches 2, 4; few tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.eval_throughput import reference_generate
from kd_utils import models
from kd_utils.data import available_tasks, load_task
from kd_utils.evaluation import generate
from kd_utils.io import write_atomic
from kd_utils.protocols import IMPROVED
from kd_utils.tasks import build_prompt, get_task, tasks_for

VARIANTS = ("dynamic", "static", "compiled")


def configure(model, variant: str) -> None:
    """Set the generation config a variant needs (evaluation.generate passes none of these)."""
    gc = model.generation_config
    gc.cache_implementation = None if variant == "dynamic" else "static"
    gc.disable_compile = variant != "compiled"
    if variant == "compiled" and model.device.type == "cpu":
        from transformers import CompileConfig

        gc.compile_config = CompileConfig()
        gc.compile_config._compile_all_devices = True


def timed(model, tokenizer, prompts: list[str], batch: int, new_tokens: int) -> tuple[float, list[str]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, new_tokens, batch_size=batch, min_new_tokens=new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def full_test_set_tokens() -> dict[str, int]:
    """Upper bound of generated tokens for the full test set of every available task of the study ('all'),
    at the improved protocol's budgets."""
    ready, _ = available_tasks([t.id for t in tasks_for("all")])
    return {t: len(load_task(t, "test")) * IMPROVED.max_new_tokens[get_task(t).domain] for t in ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: batches 2 and 4, 8 new tokens, 1 ref prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-check", type=int, default=None, help="prompts whose greedy outputs must agree")
    parser.add_argument("--ref-prompts", type=int, default=None, help="prompts the paper's loop runs")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--compile-cpu", action="store_true", help="also compile on CPU (slow to compile)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    batches = args.batches or ([2, 4] if args.tiny else [64, 128, 256, 512])
    new_tokens = args.max_new_tokens or (8 if args.tiny else 128)
    n_check = args.n_check or (4 if args.tiny else 64)
    ref_prompts = args.ref_prompts or (1 if args.tiny else 4)
    variants = args.variants or [v for v in VARIANTS if v != "compiled" or gpu or args.compile_cpu]
    if "dynamic" not in variants:
        parser.error("--variants must include dynamic: the other variants' outputs are checked against it")
    output = args.output or Path("benchmarks/results") / ("eval_gpu_tiny.json" if args.tiny else "eval_gpu.json")

    model, tokenizer = models.load_model(models.EMBEDDED_MODEL, dtype=models.default_dtype(),
                                         device=models.default_device())
    model.eval()
    prompts = [build_prompt(e.instruction, e.input) for e in load_task("gsm8k", "test")][:max(batches + [n_check])]
    load_start = os.getloadavg()
    state = {"check": {}, "warmup": {}, "rates": {}, "reference": None}

    def save(complete: bool) -> None:
        """Everything measured so far: a run cut short by its time limit still leaves its numbers."""
        result = summarize(state, variants, batches, new_tokens, n_check, ref_prompts, complete)
        result |= {"benchmark": "eval_gpu", "model": models.EMBEDDED_MODEL, "device": models.default_device(),
                   "device_name": torch.cuda.get_device_name(0) if gpu else "cpu",
                   "dtype": str(models.default_dtype()), "torch": torch.__version__, "new_tokens": new_tokens,
                   "n_check": n_check, "batches": batches, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
        write_atomic(output, json.dumps(result, indent=1) + "\n")
        if complete:
            print(result["table_markdown"])
            print(f"wrote {output}")

    # compiled decoding last: its warm-up (compilation) is the slow, uncertain part
    phases = [[v for v in variants if v != "compiled"], [v for v in variants if v == "compiled"]]
    warmed: list[str] = []
    for phase, phase_variants in enumerate(phases):
        for variant in phase_variants:
            configure(model, variant)
            state["check"][variant] = timed(model, tokenizer, prompts[:n_check], min(batches), new_tokens)[1]
            for batch in batches:
                state["warmup"][(variant, batch)] = timed(model, tokenizer, prompts[:batch], batch, new_tokens)[0]
            warmed.append(variant)
            save(complete=False)
        if phase == 0:  # the paper's loop: one prompt at a time, no cache
            state["reference"] = reference_loop(model, tokenizer, prompts[:ref_prompts], state["check"]["dynamic"],
                                                new_tokens, gpu)
            save(complete=False)
        if not phase_variants:
            continue
        # interleaved rounds over every variant warmed so far, order reversed every other round
        for rnd in range(args.rounds):
            order = warmed if rnd % 2 == 0 else warmed[::-1]
            for batch in batches:
                for variant in order:
                    configure(model, variant)
                    secs, _ = timed(model, tokenizer, prompts[:batch], batch, new_tokens)
                    state["rates"].setdefault((variant, batch), []).append(batch * new_tokens / secs)
                    print(f"phase {phase} round {rnd} batch {batch} {variant}: "
                          f"{state['rates'][(variant, batch)][-1]:,.0f} tokens/s", flush=True)
            save(complete=False)
    save(complete=True)


def reference_loop(model, tokenizer, prompts: list[str], batched_outputs: list[str], new_tokens: int,
                   gpu: bool) -> dict:
    configure(model, "dynamic")
    banned = [tokenizer.eos_token_id]
    seconds, same = 0.0, 0
    for prompt, batched in zip(prompts, batched_outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
        start = time.perf_counter()
        out = reference_generate(model, ids, new_tokens, banned)
        if gpu:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        same += tokenizer.decode(out[ids.shape[1]:], skip_special_tokens=True).strip() == batched
    return {"prompts": len(prompts), "tokens_per_s": len(prompts) * new_tokens / seconds, "same_as_dynamic": same}


def summarize(state: dict, variants: list[str], batches: list[int], new_tokens: int, n_check: int, ref_prompts: int,
              complete: bool) -> dict:
    check, rates, reference = state["check"], state["rates"], state["reference"]
    same = {v: sum(a == b for a, b in zip(check[v], check["dynamic"])) for v in check}
    summary = [{"variant": v, "batch": b, "median_tokens_per_s": statistics.median(r), "spread": max(r) - min(r),
                "rounds": r, "warmup_s": state["warmup"][(v, b)], "same_outputs_as_dynamic": f"{same[v]}/{n_check}"}
               for (v, b), r in rates.items()]
    identical = [s for s in summary if same[s["variant"]] == n_check]
    best = max(identical, key=lambda s: s["median_tokens_per_s"], default=None)
    largest = [s for s in identical if s["batch"] == max(batches)]
    at_largest = max(largest, key=lambda s: s["median_tokens_per_s"], default=None)
    tokens = full_test_set_tokens()
    full = None
    if at_largest is not None and reference is not None:
        full = {"tasks": len(tokens), "generated_tokens_upper_bound": sum(tokens.values()),
                "kept_variant": at_largest["variant"], "batch": at_largest["batch"],
                "seconds_per_model": sum(tokens.values()) / at_largest["median_tokens_per_s"],
                "paper_loop_seconds_per_model": sum(tokens.values()) / reference["tokens_per_s"]}
    lines = ["| variant | batch | tokens/s (median) | spread | warm-up s | same greedy outputs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['variant']} | {s['batch']} | {s['median_tokens_per_s']:,.1f} | {s['spread']:,.1f} | "
              f"{s['warmup_s']:.1f} | {s['same_outputs_as_dynamic']} |" for s in summary]
    if reference is not None:
        lines.append(f"| paper loop (batch 1, no cache) | 1 | {reference['tokens_per_s']:,.1f} | | | "
                     f"{reference['same_as_dynamic']}/{ref_prompts} as dynamic |")
    if best is not None and full is not None:
        lines += ["", f"fastest with identical outputs: {best['variant']} at batch {best['batch']}; full test sets "
                      f"({full['tasks']} tasks, <= {full['generated_tokens_upper_bound']:,} tokens) per model: "
                      f"{full['seconds_per_model']:.0f} s ({full['kept_variant']}, batch {full['batch']}) against "
                      f"{full['paper_loop_seconds_per_model'] / 3600:.1f} h with the paper's loop"]
    if not complete:
        lines += ["", "(incomplete: the run ended before every phase was measured)"]
    missing = [v for v in variants if v not in check]
    return {"complete": complete, "variants_not_measured": missing, "summary": summary, "best": best,
            "paper_loop": reference, "full_test_sets": full, "per_task_tokens": tokens,
            "warmup_s": {f"{v} {b}": t for (v, b), t in state["warmup"].items()}, "table_markdown": "\n".join(lines)}

if __name__ == "__main__":
    main()
