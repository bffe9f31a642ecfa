"""Peak memory and time of the chunked KD losses against the naive formula, on CPU.

Measures ``kd_utils.losses.forward_kl``, ``reverse_kl`` and ``generalized_jsd`` (forward
pass + backward to the student logits) against the naive formula in plain torch
(log_softmax of both full [B, T, V] tensors in float32, elementwise divergence, the same
masked reduction, backward) at the issue's size: vocabulary 151936 and B x T = 2 x 2048 =
4096 positions (the second sequence is padded: 1536 of its 2048 positions are in the mask).
Student and teacher logits are bf16 (what training on a GPU gives) and/or fp32 (CPU
training), drawn from a fixed seed so that every variant sees the same inputs.

Peak memory: each (loss, dtype, variant) runs in a fresh subprocess. After the inputs are
allocated the process resets its peak RSS (``/proc/self/clear_refs`` = 5) and the peak
reported is VmHWM at the end minus VmRSS at that point, i.e. everything the loss, its
autograd graph and its backward (the student gradient included) add on top of the inputs.
Where the reset is not available, ``ru_maxrss`` minus the same baseline is used (inputs are
built in small pieces, so the baseline high-water mark barely exceeds the baseline RSS).
Before running a full-size variant, its peak is predicted from a run at ``--probe-positions``
positions (peak grows linearly with positions) and the variant is skipped, with the
prediction reported, if it would not fit in the available memory.

Time: forward and backward wall time of each variant inside its subprocess, ``--repeats``
times (the minimum is reported); subprocesses of the compared variants are interleaved,
``--rounds`` times. Numerical agreement: each subprocess writes its loss and student gradient;
the table gives |loss_c - loss_n| / |loss_n| and ||grad_c - grad_n||_2 / ||grad_n||_2.

Target (issue 3, item 3): chunked peak <= 1/4 of the naive peak.

    PYTHONPATH=. python benchmarks/kd_loss_memory.py --dtypes bf16 fp32 \
        --output benchmarks/results/kd_loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TARGET_RATIO = 0.25
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd")
VARIANTS = ("naive", "chunked")
GIB = 2**30
MB = 2**20


# ------------------------------------------------------------------ worker side


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(B: int, T: int, V: int, dtype: torch.dtype, seed: int, piece: int = 16):
    """Teacher logits ~ 3 N(0,1), student = 0.8 teacher + 1.5 N(0,1), built `piece` rows at a time."""
    n = B * T
    teacher = torch.empty(n, V, dtype=dtype)
    student = torch.empty(n, V, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, piece):
        t = torch.randn(min(piece, n - i), V, generator=gen) * 3
        teacher[i:i + piece] = t
        student[i:i + piece] = 0.8 * t + 1.5 * torch.randn(t.shape, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[-1, (3 * T) // 4:] = False  # a padded sequence
    return student.view(B, T, V), teacher.view(B, T, V), mask


def naive_loss(loss: str, s, t, mask, temperature: float, beta: float):
    """The textbook formula: full fp32 log_softmax of both, elementwise divergence, masked mean."""
    logq = F.log_softmax(s.float() / temperature, dim=-1)
    logp = F.log_softmax(t.float() / temperature, dim=-1)
    if loss == "forward_kl":
        per_pos = (logp.exp() * (logp - logq)).sum(-1)
    elif loss == "reverse_kl":
        per_pos = (logq.exp() * (logq - logp)).sum(-1)
    else:
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log(1 - beta))
        per_pos = (beta * (logp.exp() * (logp - logm)).sum(-1)
                   + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1))
    m = mask.float()
    if loss == "generalized_jsd":  # pooled token mean, no tau^2
        return (per_pos * m).sum() / m.sum()
    lengths = m.sum(1)
    valid = lengths > 0
    return ((per_pos * m).sum(1)[valid] / lengths[valid]).mean() * temperature**2


def chunked_loss(loss: str, s, t, mask, temperature: float, beta: float, chunk_size: int):
    from kd_utils import losses

    if loss == "generalized_jsd":
        return losses.generalized_jsd(s, t, mask, beta=beta, temperature=temperature, chunk_size=chunk_size)
    return getattr(losses, loss)(s, t, mask, temperature=temperature, chunk_size=chunk_size)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    B, T, V = args.batch, args.seq_len, args.vocab
    student, teacher, mask = make_inputs(B, T, V, DTYPES[args.dtype], args.seed)
    base_rss_kb = status_kb("VmRSS")
    base_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = reset_peak()
    fwd, bwd, peaks = [], [], []
    for rep in range(args.repeats):
        if rep:
            hwm_reset = reset_peak() and hwm_reset
        s = student.detach().requires_grad_(True)
        t0 = time.perf_counter()
        if args.variant == "naive":
            value = naive_loss(args.loss, s, teacher, mask, args.temperature, args.beta)
        else:
            value = chunked_loss(args.loss, s, teacher, mask, args.temperature, args.beta, args.chunk_size)
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        grad = s.grad
        peak_kb = status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks.append((peak_kb - base_rss_kb) * 1024)
        if rep < args.repeats - 1:
            del grad, value, s
    out = {
        "loss": args.loss, "dtype": args.dtype, "variant": args.variant, "positions": B * T,
        "loss_value": float(value.detach().double()), "grad_dtype": str(grad.dtype).removeprefix("torch."),
        "peak_bytes": peaks[0], "peak_bytes_all_repeats": peaks, "peak_method":
            "VmHWM after clear_refs" if hwm_reset else "ru_maxrss",
        "baseline_rss_bytes": base_rss_kb * 1024,
        "baseline_maxrss_over_rss_bytes": (base_maxrss_kb - base_rss_kb) * 1024,
        "input_bytes": 2 * student.numel() * student.element_size(),
        "forward_s": fwd, "backward_s": bwd,
    }
    if args.grad_out:
        g = grad.detach().reshape(-1)
        (g.view(torch.int16) if g.dtype == torch.bfloat16 else g).numpy().tofile(args.grad_out)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ driver side


def run_worker(args, loss: str, dtype: str, variant: str, seq_len: int, batch: int, repeats: int,
               grad_out: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--loss", loss, "--dtype", dtype, "--variant", variant,
           "--batch", str(batch), "--seq-len", str(seq_len), "--vocab", str(args.vocab),
           "--temperature", str(args.temperature), "--beta", str(args.beta), "--chunk-size", str(args.chunk_size),
           "--threads", str(args.threads), "--seed", str(args.seed), "--repeats", str(repeats)]
    if grad_out:
        cmd += ["--grad-out", grad_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {loss}/{dtype}/{variant} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def grad_agreement(path_c: str, path_n: str, dtype: str, piece: int = 1 << 24) -> dict:
    raw = np.int16 if dtype == "bf16" else np.float32
    a, b = np.memmap(path_c, dtype=raw, mode="r"), np.memmap(path_n, dtype=raw, mode="r")
    diff2 = ref2 = 0.0
    max_diff = max_ref = 0.0
    for i in range(0, len(a), piece):
        x, y = torch.from_numpy(np.array(a[i:i + piece])), torch.from_numpy(np.array(b[i:i + piece]))
        if dtype == "bf16":
            x, y = x.view(torch.bfloat16), y.view(torch.bfloat16)
        x, y = x.double(), y.double()
        d = x - y
        diff2 += float(d.square().sum())
        ref2 += float(y.square().sum())
        max_diff = max(max_diff, float(d.abs().max()))
        max_ref = max(max_ref, float(y.abs().max()))
    return {"grad_rel_l2": math.sqrt(diff2 / ref2) if ref2 else float("nan"),
            "grad_max_abs_diff_over_max_abs": max_diff / max_ref if max_ref else float("nan")}


def driver(args) -> None:
    positions = args.batch * args.seq_len
    probe_T = max(1, args.probe_positions // args.batch)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="kd_loss_memory.", dir=args.tmp_dir) as tmp:
        for dtype in args.dtypes:
            for loss in args.losses:
                # probe at a small size: predicts the full-size peak (linear in positions)
                probes = {v: run_worker(args, loss, dtype, v, probe_T, args.batch, 1, None) for v in VARIANTS}
                per_position = {v: probes[v]["peak_bytes"] / probes[v]["positions"] for v in VARIANTS}
                # where the naive variant would not fit in memory, halve the sequence length (both variants)
                seq_len = args.seq_len
                while seq_len > probe_T and (per_position["naive"] * args.batch * seq_len
                                             > mem_available() - args.headroom_gb * GIB):
                    seq_len //= 2
                if seq_len != args.seq_len:
                    print(f"{loss}/{dtype}: naive predicted {per_position['naive'] * positions / GIB:.1f} GiB at "
                          f"{positions} positions, more than the available memory; measuring at seq_len {seq_len}",
                          flush=True)
                    skipped.append({"loss": loss, "dtype": dtype, "variant": "naive", "positions": positions,
                                    "predicted_peak_mb": per_position["naive"] * positions / MB,
                                    "available_mb": mem_available() / MB, "measured_instead_at_seq_len": seq_len})
                predicted = {v: per_position[v] * args.batch * seq_len for v in VARIANTS}
                results = {v: [] for v in VARIANTS}
                grads = {}
                for rnd in range(args.rounds):
                    order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
                    for v in order:
                        avail = mem_available()
                        if predicted[v] > avail - args.headroom_gb * GIB:
                            skipped.append({"loss": loss, "dtype": dtype, "variant": v,
                                            "predicted_peak_mb": predicted[v] / MB, "available_mb": avail / MB})
                            print(f"skip {loss}/{dtype}/{v}: predicted peak {predicted[v] / GIB:.1f} GiB, "
                                  f"available {avail / GIB:.1f} GiB", flush=True)
                            continue
                        grad_out = os.path.join(tmp, f"{v}.grad") if rnd == 0 else None
                        r = run_worker(args, loss, dtype, v, seq_len, args.batch, args.repeats, grad_out)
                        r["predicted_peak_bytes"] = predicted[v]
                        results[v].append(r)
                        if grad_out:
                            grads[v] = grad_out
                        print(f"{loss}/{dtype}/{v} round {rnd}: peak {r['peak_bytes'] / MB:.0f} MB, "
                              f"fwd {min(r['forward_s']):.2f}s bwd {min(r['backward_s']):.2f}s", flush=True)
                if not (results["naive"] and results["chunked"]):
                    continue
                n, c = results["naive"], results["chunked"]
                row = {"loss": loss, "dtype": dtype, "positions": args.batch * seq_len, "seq_len": seq_len,
                       "vocab": args.vocab,
                       "naive_peak_mb": max(r["peak_bytes"] for r in n) / MB,
                       "chunked_peak_mb": max(r["peak_bytes"] for r in c) / MB,
                       "naive_s": min(min(f + b for f, b in zip(r["forward_s"], r["backward_s"])) for r in n),
                       "chunked_s": min(min(f + b for f, b in zip(r["forward_s"], r["backward_s"])) for r in c),
                       "naive_forward_s": min(min(r["forward_s"]) for r in n),
                       "chunked_forward_s": min(min(r["forward_s"]) for r in c),
                       "loss_naive": n[0]["loss_value"], "loss_chunked": c[0]["loss_value"],
                       "loss_rel_diff": abs(c[0]["loss_value"] - n[0]["loss_value"]) / abs(n[0]["loss_value"]),
                       "probe_predicted_peak_mb": {v: predicted[v] / MB for v in VARIANTS},
                       "runs": {"naive": n, "chunked": c}}
                row["peak_ratio"] = row["chunked_peak_mb"] / row["naive_peak_mb"]
                row["time_ratio"] = row["chunked_s"] / row["naive_s"]
                row.update(grad_agreement(grads["chunked"], grads["naive"], dtype))
                row["target_met"] = row["peak_ratio"] <= TARGET_RATIO
                rows.append(row)
                for p in grads.values():
                    os.unlink(p)

    lines = ["| loss | inputs | positions | naive peak MB | chunked peak MB | chunked/naive | naive s (fwd+bwd) | "
             "chunked s | loss rel diff | grad rel L2 diff | target <= 1/4 |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['positions']} | {r['naive_peak_mb']:.0f} | "
                     f"{r['chunked_peak_mb']:.0f} | "
                     f"{r['peak_ratio']:.3f} | {r['naive_s']:.2f} | {r['chunked_s']:.2f} | {r['loss_rel_diff']:.1e} | "
                     f"{r['grad_rel_l2']:.1e} | {'met' if r['target_met'] else 'MISSED'} |")
    table = "\n".join(lines)
    result = {
        "benchmark": "kd_loss_memory", "batch": args.batch, "seq_len": args.seq_len, "positions": positions,
        "mask_positions": int(make_mask_count(args.batch, args.seq_len)), "vocab": args.vocab,
        "temperature": args.temperature, "beta": args.beta, "chunk_size": args.chunk_size,
        "torch": torch.__version__, "torch_threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
        "note": "2-core CPU machine shared with other work: times are noisy; peak memory is not",
        "peak_definition": "peak RSS of a fresh subprocess during forward+backward minus its RSS once the inputs are "
                           "allocated (so it includes the student gradient and all temporaries)",
        "target": {"peak_ratio_max": TARGET_RATIO, "met_all": bool(rows) and all(r["target_met"] for r in rows)},
        "results": rows, "skipped": skipped, "table_markdown": table,
        "loadavg_end": os.getloadavg(),
    }
    print(table)
    if args.output:
        from kd_utils.io import write_atomic  # here, not at the top: workers stay light

        write_atomic(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")


def make_mask_count(B: int, T: int) -> int:
    return B * T - (T - (3 * T) // 4 if B > 1 else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="default: kd_utils.losses.auto_chunk_size(vocab), the losses' default")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2, help="timed forward+backward runs per subprocess")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved subprocess rounds per variant")
    parser.add_argument("--probe-positions", type=int, default=256)
    parser.add_argument("--headroom-gb", type=float, default=2.0, help="keep this much memory free")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp-dir", default=None, help="where the gradients are written for the comparison")
    parser.add_argument("--output", type=Path, default=None)
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size is None:  # what the losses pick with their default chunk_size=None
        from kd_utils.losses import auto_chunk_size
        args.chunk_size = auto_chunk_size(args.vocab)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
