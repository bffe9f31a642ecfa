"""Training throughput (tokens/s) of SFT vs fkl with the online teacher on the embedded model.

Both train the same layer-subset student of SmolLM2-135M-Instruct with LoRA (the paper's r=8,
alpha=16 on q,k,v,up,down) on the same sample of the math mix, through ``kd_utils.training.train``,
for the same optimizer steps; fkl also runs the full embedded model as the teacher (forward,
no grad) and the chunked forward KL (tau=2). Tokens counted are the non-pad input tokens the
student processes.

Two rates per run:
- end to end: all tokens / wall time of ``train()`` (LoRA wrapping, tokenisation, the epoch
  checkpoint and the final adapter save included);
- steady state: the time between the first and the last training step's cross-entropy call
  (timestamps from a wrapper around ``training.lm_loss``), i.e. whole steps only, with no
  warm-up and no checkpointing, over the tokens of the steps inside that window.
Runs are interleaved (sft, fkl, fkl, sft, ... for ``--rounds``) in one process and the best of
each method is reported, since the CPU may be shared with other work.

No numeric target in the issue ("report training throughput"); the fkl / sft time ratio shows
the cost of the online teacher and the KD loss.

    PYTHONPATH=. python benchmarks/train_throughput.py --n-train 32 --batch-size 8 --rounds 2 \
        --output benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from kd_utils import batches, models, objectives, teachers, training
from kd_utils.data import build_training_mix
from kd_utils.evaluation import sample_examples
from kd_utils.io import write_atomic


def measure(method: str, student_dir: Path, teacher, tokenizer, examples, args) -> dict:
    student, _ = models.load_model(student_dir)
    config = training.TrainConfig(method=method, epochs=1, batch_size=args.batch_size,
                                  micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                                  val_fraction=0, temperature=2.0, seed=0)
    rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in examples]
    # the micro batches train() will run, in its order (one epoch, whole accumulation groups)
    accumulation = args.batch_size // args.micro_batch_size
    steps = len(batches.epoch_batches(rows, args.micro_batch_size, config.seed, 1)) // accumulation
    micro = batches.epoch_batches(rows, args.micro_batch_size, config.seed, 1)[:steps * accumulation]
    micro_tokens = [sum(len(r["input_ids"]) for r in m) for m in micro]
    stamps = []
    inner = objectives.lm_loss  # the training micro batches' cross-entropy (val_examples=[]: no held-out pass)

    def timed_lm_loss(logits, labels):
        stamps.append(time.perf_counter())
        return inner(logits, labels)

    objectives.lm_loss = timed_lm_loss
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            training.train(student, tokenizer, examples, config, out,
                           teacher=teachers.OnlineTeacher(teacher, tokenizer) if method != "sft" else None,
                           val_examples=[])
            seconds = time.perf_counter() - start
    finally:
        objectives.lm_loss = inner
    if len(stamps) != len(micro):
        raise RuntimeError(f"expected {len(micro)} training micro batches, timed {len(stamps)}")
    tokens = sum(micro_tokens)
    # window stamps[0] .. stamps[-1]: the rest of micro batches 0..n-2 and the forward of 1..n-1
    window_s = stamps[-1] - stamps[0]
    window_tokens = (sum(micro_tokens[:-1]) + sum(micro_tokens[1:])) / 2
    return {"method": method, "optimizer_steps": steps, "micro_batches": len(micro), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steady_seconds": window_s, "steady_tokens": window_tokens,
            "steady_tokens_per_s": window_tokens / window_s if window_s > 0 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: --batch-size (no accumulation)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per method (sft, fkl, fkl, sft, ...)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"),
                        help="write the JSON here (atomically)")
    args = parser.parse_args()
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    torch.set_num_threads(args.threads)
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    mix, _ = build_training_mix("math")
    examples = sample_examples(mix, args.n_train, seed=0)
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = models.build_student_dir(models.EMBEDDED_MODEL, args.student_layers, Path(tmp) / "student")
        for rnd in range(args.rounds):
            for method in (("sft", "fkl") if rnd % 2 == 0 else ("fkl", "sft")):
                r = measure(method, student_dir, teacher, tokenizer, examples, args)
                r["round"] = rnd
                runs.append(r)
                print(f"round {rnd} {method}: {r['tokens_per_s']:.1f} tokens/s end to end, "
                      f"{r['steady_tokens_per_s']:.1f} steady", flush=True)
    best = {m: max((r for r in runs if r["method"] == m), key=lambda r: r["steady_tokens_per_s"])
            for m in ("sft", "fkl")}
    lines = ["| method | optimizer steps | tokens | end-to-end s | end-to-end tokens/s | steady-state tokens/s |",
             "|---|---|---|---|---|---|"]
    for m in ("sft", "fkl"):
        r = best[m]
        lines.append(f"| {m} | {r['optimizer_steps']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['steady_tokens_per_s']:.1f} |")
    ratio = best["sft"]["steady_tokens_per_s"] / best["fkl"]["steady_tokens_per_s"]
    lines += ["", f"fkl (online teacher) is {ratio:.2f}x slower than sft per token (steady state, best of "
              f"{args.rounds} each)"]
    table = "\n".join(lines)
    result = {
        "benchmark": "train_throughput", "model": models.EMBEDDED_MODEL, "teacher": models.EMBEDDED_MODEL,
        "student_layers": args.student_layers, "n_train": args.n_train, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "max_length": args.max_length, "lora": True, "temperature": 2.0,
        "device": str(models.default_device()), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds, "best": best, "runs": runs, "sft_over_fkl_steady_tokens_per_s": ratio,
        "note": "CPU machine shared with other work: times are noisy (see loadavg); best of the interleaved runs",
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "table_markdown": table,
    }
    print(json.dumps(result, indent=1))
    print(table)
    if args.output is not None:
        write_atomic(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
