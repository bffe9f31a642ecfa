"""How many points of "improvement" does sampling noise alone produce under the paper's evaluation?

One model, one fixed sample of test examples, evaluated greedily once and with the paper protocol's
decoding (temperature 1, top_k 0, top_p 1) under several sampling seeds. Two sampled evaluations of
the *same* model differ only by the seed, so every difference between them is noise. Reported:

- greedy vs sampled: accuracy greedy, and per seed sampled (the `improved` vs `paper` decoding of one model);
- measured noise: the spread (sd, max |.|) of the difference between every pair of seeds;
- per-example: q_i = the fraction of seeds that got example i right; the sd of a two-seed difference on
  n examples is sqrt(2 * mean(q_i (1 - q_i)) / n) (unbiased over seeds), evaluated at the paper's test-set sizes;
- binomial bound: sqrt(2 p (1 - p) / n) at accuracy p (the case q_i = p for every example).

    PYTHONPATH=. nice .venv/bin/python benchmarks/protocol_sampling_noise.py --adapter ADAPTER --template clean \\
        --tasks svamp multiarith addsub singleeq --n 40 --seeds 0 1 2 3 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

from kd_utils import evaluation, models
from kd_utils.data import load_task
from kd_utils.io import write_atomic
from kd_utils.protocols import PAPER
from kd_utils.tasks import PROMPT_TEMPLATES, build_prompt, get_task, is_correct

# full test-set sizes of the paper's tasks (LLM-Adapters test files)
PAPER_TEST_SIZES = {"gsm8k": 1319, "svamp": 1000, "multiarith": 600, "singleeq": 508, "addsub": 395, "aqua": 254,
                    "boolq": 3270, "piqa": 1830, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267,
                    "arc_e": 2376, "arc_c": 1172, "obqa": 500}


def two_seed_sd(mean_q_var: float, n: int) -> float:
    """sd, in accuracy points, of the difference between two independent sampled evaluations on n examples."""
    return 100 * math.sqrt(2 * mean_q_var / n)


def per_example_variance(correct: dict[int, list[bool]]) -> float:
    """mean_i q_i (1 - q_i), with the S / (S - 1) correction for S seeds (q_i estimated from S draws)."""
    seeds = list(correct)
    n = len(correct[seeds[0]])
    q = [sum(correct[s][i] for s in seeds) / len(seeds) for i in range(n)]
    return statistics.fmean(qi * (1 - qi) for qi in q) * len(seeds) / max(len(seeds) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED_MODEL)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--tasks", nargs="+", default=["gsm8k"])
    parser.add_argument("--n", type=int, default=40, help="examples per task (a fixed-seed sample)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--max-new-tokens", type=int, default=PAPER.max_new_tokens["math"])
    parser.add_argument("--template", default=PAPER.eval_template, choices=sorted(PROMPT_TEMPLATES),
                        help="the prompt template (use the one the model was fine-tuned on)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="benchmarks/results/protocol_sampling_noise.json")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: at least two seeds (the noise is the difference between them)")

    model, tokenizer = models.load_model(args.model, adapter=args.adapter)
    examples = [e for task in args.tasks for e in evaluation.sample_examples(load_task(task, "test", args.data_dir),
                                                                          args.n, 0)]
    prompts = [build_prompt(e.instruction, e.input, args.template) for e in examples]

    def run(**decoding) -> list[bool]:
        outputs = evaluation.generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, **decoding)
        return [is_correct(e.task, evaluation.cut_at_response(o), e.answer) for e, o in zip(examples, outputs)]

    started, load = time.time(), [os.getloadavg()]
    greedy = run(desc="greedy")
    load.append(os.getloadavg())
    correct: dict[int, list[bool]] = {}
    for seed in args.seeds:
        correct[seed] = run(do_sample=True, temperature=PAPER.temperature, top_k=PAPER.top_k, top_p=PAPER.top_p,
                            seed=seed, desc=f"seed {seed}")
        load.append(os.getloadavg())
    n = len(examples)
    accuracy = {s: 100 * sum(c) / n for s, c in correct.items()}
    diffs = [accuracy[a] - accuracy[b] for a, b in itertools.combinations(args.seeds, 2)]
    mean_q_var = per_example_variance(correct)
    p = statistics.fmean(accuracy.values()) / 100
    domain = get_task(args.tasks[0]).domain
    at_sizes = {task: {"n": size, "sd_per_example_points": two_seed_sd(mean_q_var, size),
                       "sd_binomial_points": two_seed_sd(p * (1 - p), size)}
                for task, size in PAPER_TEST_SIZES.items() if get_task(task).domain == domain}
    result = {
        "model": args.model, "adapter": args.adapter, "tasks": args.tasks, "n": n, "seeds": args.seeds,
        "max_new_tokens": args.max_new_tokens, "template": args.template,
        "decoding": {"temperature": PAPER.temperature, "top_k": PAPER.top_k, "top_p": PAPER.top_p},
        "accuracy_greedy": 100 * sum(greedy) / n,
        "accuracy_per_task_greedy": {t: 100 * statistics.fmean(g for e, g in zip(examples, greedy) if e.task == t)
                                     for t in args.tasks},
        "accuracy_per_seed": accuracy, "pairwise_differences_points": diffs,
        "measured_sd_of_difference_points": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "measured_max_abs_difference_points": max(map(abs, diffs)),
        "sd_of_difference_at_this_n": {"per_example": two_seed_sd(mean_q_var, n),
                                       "binomial": two_seed_sd(p * (1 - p), n)},
        "at_paper_test_sizes": at_sizes, "seconds": round(time.time() - started, 1), "loadavg": load,
    }
    write_atomic(Path(args.output), json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("accuracy_greedy", "accuracy_per_seed", "measured_sd_of_difference_points",
                                             "sd_of_difference_at_this_n")}, indent=1))
    for task, row in at_sizes.items():
        print(f"{task:11s} n={row['n']:5d}  two-seed sd {row['sd_per_example_points']:.2f} points "
              f"(binomial {row['sd_binomial_points']:.2f})")


if __name__ == "__main__":
    main()
