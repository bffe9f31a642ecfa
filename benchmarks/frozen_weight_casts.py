"""Generation under bf16 autocast with frozen weights: cast once per call (``precision.inference_autocast``) or at
every decoding step (plain ``precision.autocast``, as evaluation ran before).

torch's autocast keeps its bf16 copy only of leaf tensors that require grad; a LoRA student's base weights and a
merged teacher are frozen, so plain autocast casts them again at every step. Each model (the embedded
SmolLM2-135M-Instruct cut to a layer subset, with a fresh LoRA adapter on top, as a study's students are
evaluated; and the full model frozen) generates ``--new-tokens`` greedy tokens for the same prompts through
``evaluation.generate`` both ways, interleaved over rounds in alternating order; the outputs must be identical.
Reports tokens/s per round, the median ratio and the load average.

    PYTHONPATH=. python benchmarks/frozen_weight_casts.py --rounds 3 \
        --output benchmarks/results/frozen_weight_casts.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from kd_utils import evaluation, models, precision
from kd_utils.io import write_atomic
from kd_utils.training import TrainConfig, wrap_lora

PROMPTS = [f"Question {i}: a farmer has {i + 3} baskets with {2 * i + 5} apples each. How many apples are there in "
           "all? Explain step by step." for i in range(16)]


@contextlib.contextmanager
def per_step_casts(model, resolved: str, device=None):
    """Plain autocast under no_grad: what evaluation.generate used before."""
    with torch.no_grad(), precision.autocast(resolved, device):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/frozen_weight_casts.json"))
    args = parser.parse_args()
    resolved = precision.resolve("bf16", "cpu")
    base, tok = models.load_model(models.EMBEDDED_MODEL)
    variants = {"per_step": per_step_casts, "once": precision.inference_autocast}
    load = [os.getloadavg()[0]]
    results = {}
    for keep in args.layers:
        if keep < base.config.num_hidden_layers:
            model = wrap_lora(models.make_student(base, keep), TrainConfig()).eval()  # base frozen, LoRA trainable
            name = f"{keep} layers + LoRA"
        else:
            model = base.requires_grad_(False)
            name = f"{keep} layers, frozen"
        rates: dict[str, list[float]] = {v: [] for v in variants}
        outputs = {}
        for rnd in range(args.rounds):
            for variant in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
                precision.inference_autocast = variants[variant]  # what evaluation.generate calls
                start = time.perf_counter()
                outputs[variant] = evaluation.generate(model, tok, PROMPTS, args.new_tokens, args.batch_size,
                                                       min_new_tokens=args.new_tokens, precision=resolved)
                rates[variant].append(len(PROMPTS) * args.new_tokens / (time.perf_counter() - start))
                print(f"{name} round {rnd} {variant}: {rates[variant][-1]:.0f} tokens/s", flush=True)
        precision.inference_autocast = variants["once"]
        ratios = [o / p for o, p in zip(rates["once"], rates["per_step"])]
        results[name] = {"tokens_per_s": {v: [round(r, 1) for r in rs] for v, rs in rates.items()},
                         "ratio_per_round": [round(r, 3) for r in ratios],
                         "ratio_median": round(statistics.median(ratios), 3),
                         "identical_outputs": outputs["once"] == outputs["per_step"]}
        load.append(os.getloadavg()[0])
    report = {"benchmark": "frozen_weight_casts", "precision": resolved, "rounds": args.rounds,
              "order": "alternating", "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "loadavg_samples": [round(x, 2) for x in load], "models": results}
    write_atomic(args.output, json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
