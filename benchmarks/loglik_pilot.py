"""Log-likelihood choice scoring of the untuned embedded model and layer-pruned copies (no training).

    OMP_NUM_THREADS=1 python benchmarks/loglik_pilot.py [--n 200] [--layers 30 20] [--tasks ...] [--output PATH]

Scores a fixed-seed sample of ``n`` test items of every available multiple-choice commonsense task
with kd_utils.choice_scoring (acc and acc_norm), for the embedded SmolLM2-135M-Instruct with the
given numbers of its 30 layers kept (30: the model itself). One CSV row per (layers, task), appended
as each finishes, so a rerun skips what is done. Also prints each task's majority-class rate.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import pandas as pd
import torch

from kd_utils import choice_scoring as cs
from kd_utils import models
from kd_utils.data import available_tasks, load_task
from kd_utils.evaluation import sample_examples

COLUMNS = ["layers", "task", "n", "acc", "acc_norm", "majority", "seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 20])
    parser.add_argument("--tasks", nargs="+", default=list(cs.CHOICE_TASKS), choices=cs.CHOICE_TASKS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="benchmarks/results/loglik_pilot.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=COLUMNS)
    tasks, skipped = available_tasks(args.tasks)
    for task, why in skipped.items():
        print(f"skipping {task}: {why}")
    base, tokenizer = models.load_model(models.EMBEDDED_MODEL, dtype=torch.float32, device="cpu")
    for keep in args.layers:
        model = base if keep == base.config.num_hidden_layers else models.make_student(base, keep)
        for task in tasks:
            if ((done["layers"] == keep) & (done["task"] == task)).any():
                continue
            examples = sample_examples(load_task(task, "test"), args.n, 0)
            started = time.time()
            records = cs.score_examples(model, tokenizer, examples, args.batch_size, "acc")
            majority = max(collections.Counter(r["label"] for r in records).values()) / len(records)
            row = {"layers": keep, "task": task, "n": len(records),
                   "acc": 100 * sum(r["correct_acc"] for r in records) / len(records),
                   "acc_norm": 100 * sum(r["correct_acc_norm"] for r in records) / len(records),
                   "majority": round(100 * majority, 1), "seconds": round(time.time() - started, 1)}
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            done.to_csv(out, index=False)
            print(row, flush=True)
    print(done.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
