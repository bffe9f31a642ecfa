"""Zero-shot evaluation throughput: our batched KV-cache path against the paper's reference loop.

Batched: ``kd_utils.evaluation.generate`` (left-padded batches, HF generate with the KV cache, greedy).
Reference: the paper's loop, one example at a time with no cache: each new token re-runs the whole
sequence and takes the argmax of the last position.

Both decode the same gsm8k test prompts greedily and generate exactly ``max_new_tokens`` tokens each
(``min_new_tokens=max_new_tokens`` in the batched path; the reference never stops and masks EOS, which
is what min_new_tokens does), so generated-token counts are equal and outputs comparable token by token.

Target: batched >= 15x the reference's tokens/s, with the same greedy outputs on >= 95% of prompts.

    python benchmarks/eval_throughput.py [--n-prompts 16] [--ref-prompts 8] [--output out.json]

``--ref-prompts k`` runs the (slow) reference on the first k prompts only: its tokens/s is measured
on those k, agreement is counted over those k, and its time for all prompts is an estimate (scaled by n/k).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from kd_utils.data import load_task
from kd_utils.evaluation import generate
from kd_utils.models import default_device, load_model
from kd_utils.tasks import build_prompt

TARGET_SPEEDUP, TARGET_AGREEMENT = 15.0, 0.95


@torch.inference_mode()
def reference_generate(model, ids: torch.Tensor, max_new_tokens: int, banned: list[int]) -> torch.Tensor:
    """The paper's loop for one example: no cache, full sequence each step, argmax of the last position."""
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        logits[banned] = -math.inf  # no EOS before max_new_tokens, as min_new_tokens does in the batched path
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0]


def capture_generate(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Record (input_ids, attention_mask, output) of every model.generate call, to count and compare tokens."""
    calls = []
    inner = model.generate

    def wrapped(**kwargs):
        out = inner(**kwargs)
        calls.append((kwargs["input_ids"], kwargs["attention_mask"], out))
        return out

    model.generate = wrapped
    return calls


def rates(seconds: float, tokens: int, examples: int) -> dict:
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "examples_per_s": examples / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--ref-prompts", type=int, default=None, help="reference on the first k prompts (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_ref = min(args.ref_prompts or args.n_prompts, args.n_prompts)

    device = default_device()
    model, tokenizer = load_model(args.model, device=device)
    prompts = [build_prompt(ex.instruction, ex.input) for ex in load_task("gsm8k", "test")[:args.n_prompts]]
    prompt_ids = [tokenizer(p, return_tensors="pt").input_ids.to(device) for p in prompts]
    eos = model.generation_config.eos_token_id
    banned = eos if isinstance(eos, list) else [eos]
    load_start = os.getloadavg()

    # batched path: warm up on two prompts and a few tokens, then time
    with torch.inference_mode():
        generate(model, tokenizer, prompts[:2], 4, args.batch_size, min_new_tokens=4, desc="warmup")
    calls = capture_generate(model)
    with torch.inference_mode():
        t0 = time.perf_counter()
        batched_texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                 min_new_tokens=args.max_new_tokens, desc="batched")
        batched_s = time.perf_counter() - t0
    batched_ids = {}  # prompt token ids -> generated token ids
    for input_ids, mask, out in calls:
        for row in range(out.shape[0]):
            key = tuple(input_ids[row][mask[row].bool()].tolist())
            batched_ids[key] = out[row, input_ids.shape[1]:].tolist()
    batched_tokens = sum(out.shape[0] * (out.shape[1] - input_ids.shape[1]) for input_ids, _, out in calls)

    # reference loop: warm up on one prompt and a few tokens, then time
    reference_generate(model, prompt_ids[0], 4, banned)
    t0 = time.perf_counter()
    reference_ids = [reference_generate(model, ids, args.max_new_tokens, banned)[ids.shape[1]:].tolist()
                     for ids in prompt_ids[:n_ref]]
    reference_s = time.perf_counter() - t0
    reference_tokens = sum(len(ids) for ids in reference_ids)
    load_end = os.getloadavg()

    first_diff = {}  # prompt index -> first differing token position
    same_text = 0
    for i, ref in enumerate(reference_ids):
        ours = batched_ids[tuple(prompt_ids[i][0].tolist())]
        if ours != ref:
            first_diff[i] = next((p for p, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        same_text += batched_texts[i] == tokenizer.decode(ref, skip_special_tokens=True).strip()

    batched = rates(batched_s, batched_tokens, len(prompts))
    reference = {"n_prompts": n_ref, **rates(reference_s, reference_tokens, n_ref)}
    if n_ref < len(prompts):
        reference["estimated_seconds_all_prompts"] = reference_s * len(prompts) / n_ref
    speedup = batched["tokens_per_s"] / reference["tokens_per_s"]
    same_tokens = n_ref - len(first_diff)
    result = {
        "model": args.model, "device": device, "task": "gsm8k", "n_prompts": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "prompt_tokens_mean": sum(ids.shape[1] for ids in prompt_ids) / len(prompts),
        "reference_prompt_tokens_mean": sum(ids.shape[1] for ids in prompt_ids[:n_ref]) / n_ref,
        "batched": batched, "reference": reference, "speedup_tokens_per_s": speedup,
        "agreement": {"compared": n_ref, "same_token_ids": same_tokens, "same_text": same_text,
                      "differ": len(first_diff), "first_diff_position": first_diff},
        "target": {"speedup": TARGET_SPEEDUP, "agreement": TARGET_AGREEMENT,
                   "met": speedup >= TARGET_SPEEDUP and same_tokens >= TARGET_AGREEMENT * n_ref},
        "loadavg_start": load_start, "loadavg_end": load_end,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
