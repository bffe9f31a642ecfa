"""Does a short fine-tune move a layer-pruned student's log-likelihood choice scores? (sizing a pruned-student study)

    OMP_NUM_THREADS=1 python benchmarks/loglik_recovery_pilot.py [--layers 20] [--n-train 300] [--n 200]

Trains the embedded SmolLM2-135M-Instruct cut to ``--layers`` layers on ``--n-train`` rows of the
commonsense mix (LoRA, 1 epoch, the study's student settings) under each variant, then scores piqa and
arc_e by log-likelihood (kd_utils.choice_scoring, n items, seed 0):
- ``sft``: the improved protocol, loss on the response ("the correct answer is answer2") only;
- ``sft_inputs``: improved[train_on_inputs=true], the prompt's tokens (question and choices) in the loss too;
- ``fkl_all``: fkl from the untuned full model at tau 2 over every real token (kd.distill_positions: paper),
  the improved protocol otherwise.
One CSV row per (variant, task), written as each finishes; a rerun skips finished variants (and resumes
a variant's training from its checkpoint).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from kd_utils import models
from kd_utils.evaluation import evaluate_tasks
from kd_utils.training import run_training

VARIANTS = {
    "sft": {"method": "sft", "protocol": "improved"},
    "sft_inputs": {"method": "sft", "protocol": "improved[train_on_inputs=true]"},
    "fkl_all": {"method": "fkl", "protocol": "improved", "teacher": models.EMBEDDED_MODEL, "temperature": 2.0,
                "distill_positions": "paper"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work-dir", default="outputs/loglik_recovery_pilot", help="training runs (large)")
    parser.add_argument("--output", default="benchmarks/results/loglik_recovery_pilot.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    out = Path(args.output)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    for name in args.variants:
        if len(done) and (done["variant"] == name).any():
            continue
        run_dir = work / f"{name}-L{args.layers}"
        started = time.time()
        summary = run_training(model=models.EMBEDDED_MODEL, output_dir=run_dir, domain="commonsense",
                               student_layers=args.layers, n_train=args.n_train, epochs=1, batch_size=16,
                               micro_batch_size=8, max_length=256, lr=3e-4, val_fraction=0.05, seed=0,
                               **VARIANTS[name])
        trained = time.time() - started
        model, tokenizer = models.load_model(summary["base_model"], adapter=run_dir / "adapter", dtype=torch.float32,
                                             device="cpu")
        metrics = evaluate_tasks(model, tokenizer, ["piqa", "arc_e"], n_per_task=args.n, batch_size=16,
                                 scoring="loglik", loglik_metric="acc_norm")
        rows = metrics.assign(variant=name, layers=args.layers, n_train=args.n_train, train_seconds=round(trained),
                              eval_seconds=round(time.time() - started - trained))
        done = pd.concat([done, rows[["variant", "layers", "n_train", "task", "n", "accuracy_acc", "accuracy_acc_norm",
                                      "train_seconds", "eval_seconds"]]], ignore_index=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        done.to_csv(out, index=False)
        print(done.to_string(index=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
