"""The protocol ablation, measured: the ablation_protocol_* studies compared on the same test examples.

Reads ``outputs/ablation_protocol_{improved,train_on_inputs,paper}/results.csv`` and the runs' predictions
(every study evaluates the same fixed-seed sample of each task) and reports, pooled over the tasks:

- every student run's accuracy and its KD-minus-SFT within its study (exact McNemar against that SFT run);
- train-on-inputs: SFT under ``improved[kd_positions=paper,train_on_inputs=true]`` minus SFT under ``improved``,
  and the same for KD-minus-SFT (paired on the examples);
- GKD with tau (``improved``, tau = 2) minus without (tau = 1: the JSD carries no tau**2 factor, so tau = 1 is
  the untempered objective), and whether the ``paper`` protocol's tau = 1 and tau = 2 GKD runs are replicates;
- the whole paper protocol against the improved one.

Paired differences come with exact McNemar p-values and a 95% interval (``per_example.paired_difference``).

    .venv/bin/python benchmarks/protocol_ablation.py [--outputs outputs] [--output benchmarks/results/protocol_ablation.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils.io import write_atomic
from kd_utils.predictions import load_predictions, predictions_path
from kd_utils.statistics.per_example import paired_difference

HALVES = ("improved", "train_on_inputs", "paper")


def outcomes(study_dir: Path, run_id: str, tasks: list[str]) -> pd.DataFrame:
    """correct and output per (task, id) of one evaluation run, pooled over the tasks."""
    frames = [load_predictions(predictions_path(study_dir / "runs", run_id, task)).assign(task=task) for task in tasks]
    return pd.concat(frames).set_index(["task", "id"])[["correct", "output"]].sort_index()


def paired(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    if not a.index.equals(b.index):
        raise ValueError("the two runs were not evaluated on the same examples")
    return paired_difference(a["correct"].to_numpy(), b["correct"].to_numpy())


def student_runs(study_dir: Path) -> tuple[dict[tuple[str, float], pd.DataFrame], dict]:
    results = pd.read_csv(study_dir / "results.csv")
    tasks = sorted(results["task"].unique())
    runs = {}
    for (method, temperature, run_id), _ in results[results["role"] == "student"].groupby(
            ["method", results["temperature"].fillna(0.0), "run_id"]):
        runs[(method, 0.0 if method == "sft" else float(temperature))] = outcomes(study_dir, run_id, tasks)
    teacher = results[results["role"] == "teacher"]
    info = {"protocol": results["protocol"].iloc[0], "tasks": tasks, "n": int(teacher["n"].sum()),
            "teacher_accuracy": 100 * teacher["correct"].sum() / teacher["n"].sum()}
    return runs, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default="outputs")
    parser.add_argument("--output", default="benchmarks/results/protocol_ablation.json")
    args = parser.parse_args()
    studies = {half: student_runs(Path(args.outputs) / f"ablation_protocol_{half}") for half in HALVES
               if (Path(args.outputs) / f"ablation_protocol_{half}" / "results.csv").is_file()}
    if "improved" not in studies:
        raise SystemExit(f"no {args.outputs}/ablation_protocol_improved/results.csv: run the study first")
    report: dict = {"studies": {h: info for h, (_, info) in studies.items()}, "runs": [], "contrasts": {}}
    for half, (runs, info) in studies.items():
        sft = runs[("sft", 0.0)]
        for (method, tau), run in sorted(runs.items()):
            row = {"half": half, "protocol": info["protocol"], "method": method, "temperature": tau or None,
                   "accuracy": 100 * run["correct"].mean()}
            if method != "sft":
                row["kd_minus_sft"] = paired(run, sft)
            report["runs"].append(row)

    def kd_minus_sft(half: str, method: str) -> pd.DataFrame:
        """Per example, the mean over temperatures of KD correct minus SFT correct (in [-1, 1])."""
        runs = studies[half][0]
        kd = np.mean([r["correct"].astype(float) for (m, _), r in runs.items() if m == method], axis=0)
        return pd.Series(kd - runs[("sft", 0.0)]["correct"].astype(float), index=runs[("sft", 0.0)].index)

    contrasts = report["contrasts"]
    improved = studies["improved"][0]
    if "train_on_inputs" in studies:
        tio = studies["train_on_inputs"][0]
        contrasts["sft: train on inputs minus response only"] = paired(tio[("sft", 0.0)], improved[("sft", 0.0)])
        delta = kd_minus_sft("train_on_inputs", "fkl") - kd_minus_sft("improved", "fkl")
        se = delta.std(ddof=1) / math.sqrt(len(delta))
        contrasts["fkl KD-minus-SFT (mean over tau): train on inputs minus response only"] = {
            "difference": 100 * delta.mean(), "ci_low": 100 * (delta.mean() - 1.96 * se),
            "ci_high": 100 * (delta.mean() + 1.96 * se),
            "n": int(len(delta))}
    contrasts["gkd: with tau (tau=2) minus without (tau=1), improved"] = paired(improved[("gkd", 2.0)],
                                                                               improved[("gkd", 1.0)])
    if "paper" in studies:
        paper = studies["paper"][0]
        same = (paper[("gkd", 1.0)]["output"] == paper[("gkd", 2.0)]["output"]).mean()
        contrasts["gkd under paper: share of identical outputs, tau=1 vs tau=2"] = {"share": float(same)}
        contrasts["sft: paper protocol minus improved"] = paired(paper[("sft", 0.0)], improved[("sft", 0.0)])
    write_atomic(Path(args.output), json.dumps(report, indent=1))
    print(pd.DataFrame([{**{k: r[k] for k in ("half", "method", "temperature", "accuracy")},
                         "kd_minus_sft": r.get("kd_minus_sft", {}).get("difference"),
                         "p": r.get("kd_minus_sft", {}).get("pvalue")} for r in report["runs"]]).round(3).to_string())
    for name, c in contrasts.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
