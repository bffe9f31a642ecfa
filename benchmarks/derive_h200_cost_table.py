"""A cost table for the NVIDIA H200 derived from the committed H200 measurements: DERIVED, NOT MEASURED.

    PYTHONPATH=. python benchmarks/derive_h200_cost_table.py [--output benchmarks/results/cost_table_h200_derived.json]

No `python -m kd_utils.costs calibrate` has run on an H200 yet (the GPU session's call 2, benchmarks/gpu_call2.sh,
does it first). Until then the dry-run prices GPU studies with rates derived from what was measured there
(``KD_COST_TABLE=<this file> KD_COST_DEVICE="NVIDIA H200" python -m kd_utils.study run ... --dry-run``):

- train: the SFT steady-state tokens/s of ``train_throughput_gpu_h200.json`` (10-layer LoRA student, micro
  batch 16 x up to 256 tokens, bf16 autocast);
- forward: the online teacher's share of the fkl step there, 1 / (1/fkl - 1/sft) tokens/s of the full model
  (teacher forward plus the KD loss: an underestimate of a bare forward's rate);
- generate: a decoding step taken to cost what that teacher forward of one micro batch cost (the model is
  small, so a step is bound by per-layer overhead, not by the batch): batch / step seconds tokens/s, for
  batches 16-512. Nothing about decoding was measured on the H200; this is the weakest figure;
- run overhead: the CPU table's (a fresh process importing the package and loading the model), when given,
  else the default study's measured analysis run (16 s, a notebook that loads no model; README).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd_utils import costs
from kd_utils.models import EMBEDDED_MODEL

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "NVIDIA H200"
ANALYSIS_RUN_S = 16.0  # README "Measured numbers": the default study's analysis and report run


def derive(train_json: Path, overhead_s: float) -> tuple[costs.CostTable, dict]:
    measured = json.loads(train_json.read_text())
    if measured["device"] != "cuda":
        raise ValueError(f"{train_json}: not a GPU measurement (device {measured['device']!r})")
    sft = measured["best"]["sft"]["steady_tokens_per_s"]
    fkl = measured["best"]["fkl"]["steady_tokens_per_s"]
    micro = measured["micro_batch_size"]
    steps = measured["best"]["sft"]["micro_batches"]
    tokens_per_micro = measured["best"]["sft"]["tokens"] / steps
    student = costs.model_parameters(EMBEDDED_MODEL, measured["student_layers"])
    teacher = costs.model_parameters(EMBEDDED_MODEL)
    forward = 1 / (1 / fkl - 1 / sft)  # the teacher's share of an fkl step
    step_s = tokens_per_micro / forward  # one teacher forward of a micro batch
    entries = [{"kind": "train", "n_params": student, "batch": micro, "tokens_per_s": sft},
               {"kind": "forward", "n_params": teacher, "batch": micro, "tokens_per_s": forward}]
    entries += [{"kind": "generate", "n_params": teacher, "batch": b, "tokens_per_s": b / step_s}
                for b in (16, 64, 256, 512)]
    info = {"derived": True, "measured": False, "source": train_json.name,
            "derivation": __doc__.split("\n\n", 2)[2].strip(), "decode_step_s": step_s,
            "tokens_per_micro_batch": tokens_per_micro}
    return costs.CostTable(DEVICE, entries, overhead_s), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=RESULTS / "train_throughput_gpu_h200.json")
    parser.add_argument("--cpu-table", type=Path, default=None, help="a CPU cost table whose run overhead to use")
    parser.add_argument("--output", type=Path, default=RESULTS / "cost_table_h200_derived.json")
    args = parser.parse_args()
    cpu = costs.load_table(args.cpu_table, "cpu") if args.cpu_table else None
    table, info = derive(args.train, cpu.run_overhead_s if cpu else ANALYSIS_RUN_S)
    info["run_overhead_source"] = "CPU cost table" if cpu else "default study's analysis run (README)"
    costs.save_table(table, args.output, info)
    for e in table.entries:
        print(f"  {e['kind']:8s} {e['n_params'] / 1e6:5.0f}M batch {e['batch']:3d}: {e['tokens_per_s']:9,.0f} tokens/s")
    print(f"  decode step {info['decode_step_s'] * 1e3:.1f} ms; run overhead {table.run_overhead_s:.1f} s; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
