"""The KD-loss benchmark on a CUDA GPU: peak memory and time, chunked vs naive, bf16 logits.

Same inputs, formulas and size as ``kd_loss_memory.py`` (vocabulary 151936, 2 x 2048 = 4096
positions, bf16 student and teacher logits as training on a GPU gives), measured with the CUDA
allocator: peak = ``torch.cuda.max_memory_allocated`` during forward + backward minus what was
allocated before it (the inputs; the previous run's graph and gradient are freed first, so the
student gradient is counted). Time: median of ``--repeats`` synchronised
forward + backward runs after one warm-up. Agreement: relative difference of the loss and
relative L2 difference of the student gradient against the naive formula.

    python benchmarks/kd_loss_gpu.py --output benchmarks/results/kd_loss_gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kd_utils.io import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_loss_memory import LOSSES, MB, TARGET_RATIO, chunked_loss, make_inputs, naive_loss  # noqa: E402


def measure(fn, student: torch.Tensor, repeats: int) -> dict:
    """Peak extra CUDA memory and median time of fn(student) + backward; the loss and gradient of the last run."""
    times, last = [], {}
    for i in range(repeats + 1):
        last = {}  # free the previous run's gradient first: it must not sit in the baseline
        leaf = student.detach().requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = fn(leaf)
        loss.backward()
        torch.cuda.synchronize()
        if i:  # the first run warms up kernels and the allocator
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - base
        last = {"loss": float(loss.detach()), "grad": leaf.grad}
        del loss, leaf  # the graph holds the input and its gradient
    return {"peak_mb": peak / MB, "seconds": statistics.median(times), **last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kd_loss_gpu.py needs a CUDA GPU; kd_loss_memory.py is the CPU benchmark")
    student, teacher, mask = make_inputs(args.batch, args.seq_len, args.vocab, torch.bfloat16, seed=0)
    student, teacher, mask = student.cuda(), teacher.cuda(), mask.cuda()
    rows = []
    for loss in LOSSES:
        naive = measure(lambda s: naive_loss(loss, s, teacher, mask, args.temperature, args.beta), student,
                        args.repeats)
        chunked = measure(lambda s: chunked_loss(loss, s, teacher, mask, args.temperature, args.beta, None), student,
                          args.repeats)
        grad_diff = (chunked["grad"].float() - naive["grad"].float()).norm() / naive["grad"].float().norm()
        rows.append({"loss": loss, "naive_peak_mb": round(naive["peak_mb"], 1),
                     "chunked_peak_mb": round(chunked["peak_mb"], 1),
                     "ratio": round(chunked["peak_mb"] / naive["peak_mb"], 3),
                     "naive_ms": round(1000 * naive["seconds"], 1), "chunked_ms": round(1000 * chunked["seconds"], 1),
                     "loss_rel_diff": abs(chunked["loss"] - naive["loss"]) / abs(naive["loss"]),
                     "grad_rel_l2": float(grad_diff),
                     "target_met": chunked["peak_mb"] <= TARGET_RATIO * naive["peak_mb"]})
        del naive, chunked
    print(f"{torch.cuda.get_device_name()}, bf16 logits [{args.batch}, {args.seq_len}, {args.vocab}]\n")
    print("| loss | naive peak MB | chunked peak MB | ratio | naive ms | chunked ms | loss rel diff | grad rel L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['naive_peak_mb']} | {r['chunked_peak_mb']} | {r['ratio']} | {r['naive_ms']} | "
              f"{r['chunked_ms']} | {r['loss_rel_diff']:.1e} | {r['grad_rel_l2']:.1e} |")
    if args.output:
        write_atomic(args.output, json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab,
                                           "temperature": args.temperature, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
