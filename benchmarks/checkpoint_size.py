"""Epoch checkpoints: the whole model (accelerate's save_state as is) against the trained weights only
(``training.keep_trainable_weights``, what training registers), for a LoRA student of the embedded model.

    .venv/bin/python benchmarks/checkpoint_size.py [--layers 20] [--rounds 3] [--output PATH]

Each measurement is a fresh process that prepares the model and optimizer and saves one checkpoint, as a run's
first epoch does (a process's first save is the slow one); the variants alternate in order over the rounds.
Reports the median and range of the save time, alone (into the page cache) and until ``os.sync`` returns (on
disk), and the checkpoint's size, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("whole model", "trained weights")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_once(variant: str, layers: int, target: Path) -> dict:
    import torch
    from accelerate import Accelerator

    from kd_utils import models, training
    from kd_utils.training import TrainConfig

    base, _ = models.load_model(models.EMBEDDED_MODEL)
    model = training.wrap_lora(models.make_student(base, layers), TrainConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    accelerator = Accelerator(mixed_precision="no")
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.tensor([[1, 2, 3, 4]])
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()  # so the optimizer has its state to save
    if variant == "trained weights":
        accelerator.register_save_state_pre_hook(training.keep_trainable_weights)
    os.sync()
    start = time.perf_counter()
    accelerator.save_state(str(target))
    saved = time.perf_counter() - start
    os.sync()
    return {"save_s": saved, "synced_s": time.perf_counter() - start, "bytes": dir_bytes(target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20,
                        help="layers of the embedded model kept (the default study's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/checkpoint_size.json"))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a measuring child process
    parser.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(save_once(args.one, args.layers, args.target)))
        return
    from kd_utils.io import write_atomic

    load_start = os.getloadavg()
    measured: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for r in range(args.rounds):
            for i, variant in enumerate(VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                target = Path(tmp, f"{r}-{i}")
                out = subprocess.run([sys.executable, __file__, "--one", variant, "--layers", str(args.layers),
                                      "--target", str(target)], capture_output=True, text=True, check=True)
                measured[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for variant, runs in measured.items():
        row = {"variant": variant, "bytes": runs[0]["bytes"]}
        for key in ("save_s", "synced_s"):
            values = [m[key] for m in runs]
            row |= {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
        rows.append(row)
        print(f"{variant:16s} save {row['save_s']:.2f} s (range {row['save_s_min']:.2f}-{row['save_s_max']:.2f}), "
              f"to disk {row['synced_s']:.2f} s ({row['synced_s_min']:.2f}-{row['synced_s_max']:.2f}), "
              f"{row['bytes'] / 1e6:,.1f} MB")
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    write_atomic(args.output, json.dumps({
        "model": f"embedded model, {args.layers} layers, LoRA r=8 (TrainConfig defaults), AdamW state",
        "device": "cpu", "rounds": args.rounds, "loadavg_start": load_start, "loadavg_end": load_end,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
