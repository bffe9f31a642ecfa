"""The protocol ablation, measured: the ablation_protocol_* studies compared on the same test examples.

Reads ``outputs/ablation_protocol_{improved,train_on_inputs,paper}/results.csv`` and the runs' predictions
(every study evaluates the same fixed-seed sample of each task) and reports, pooled over the tasks:

- every student run's accuracy and its KD-minus-SFT within its study (exact McNemar against that SFT run), and
  its held-out cross-entropy after training (the labelled tokens of 16 held-out rows: response tokens under
  ``improved``, so comparable across its runs; every token under train-on-inputs, so not across halves);
- train-on-inputs: SFT under ``improved[kd_positions=paper,train_on_inputs=true]`` minus SFT under ``improved``,
  and the same for KD-minus-SFT (paired on the examples);
- GKD with tau (``improved``, tau = 2) minus without (tau = 1: the JSD carries no tau**2 factor, so tau = 1 is
  the untempered objective), and whether the ``paper`` protocol's tau = 1 and tau = 2 GKD runs are replicates;
- the whole paper protocol against the improved one.

Paired differences come with exact McNemar p-values and a 95% interval (``per_example.paired_difference``).

    .venv/bin/python benchmarks/protocol_ablation.py [--outputs outputs] \
        [--output benchmarks/results/protocol_ablation.json]

``--gkd-switches`` instead trains small GKD students (no study needed) under ``paper`` and under ``paper`` with
one field switched: gradient clipping off (``max_grad_norm=null``), the on-policy prompt tokenized alone
(``policy_prompt=prompt``), the samples kept as tokens (``policy_retokenize=false``); each with a few seeds, and
records their held-out cross-entropy under ``gkd_switches`` in the same JSON (runs already there are kept, so
it resumes). Scope: SmolLM2-135M-Instruct (not fine-tuned) teaching its 20-layer copy, LoRA, 48 rows of the
math mix, 1 epoch of 6 steps (batch 8, lr 1e-3, 2 warmup steps instead of the paper's 100), max length 96,
16 sampled tokens, tau 5 (the paper's GKD ignores tau), 16 held-out rows (every token: train on inputs).
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
from kd_utils.protocols import get_protocol
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


def held_out_losses(study_dir: Path) -> dict[tuple[str, float], float]:
    """Final held-out cross-entropy of every student training run, by (method, temperature)."""
    losses = {}
    for summary in (study_dir / "runs").glob("student-*/train_summary.json"):
        run = json.loads((summary.parent / "params.json").read_text())["run"]["parameters"]
        tau = 0.0 if run["method"] == "sft" else float(run["temperature"])
        losses[(run["method"], tau)] = json.loads(summary.read_text())["final_val_loss"]
    return losses


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


GKD_SWITCHES = ("paper", "paper[max_grad_norm=null]", "paper[policy_prompt=prompt]", "paper[policy_retokenize=false]")


def gkd_switches(output: Path, work: Path, seeds: list[int]) -> None:
    """Held-out cross-entropy of small GKD runs under paper and paper with one field switched (see the docstring)."""
    import time

    import torch

    from kd_utils import models, teachers, training
    from kd_utils.data import build_training_mix
    from kd_utils.evaluation import sample_examples

    report = json.loads(output.read_text()) if output.is_file() else {}
    done = report.setdefault("gkd_switches", {"scope": __doc__.split("``--gkd-switches``")[1].strip(),
                                               "runs": []})["runs"]
    base = models.embedded_model_dir()
    student_dir = models.build_student_dir(base, 20, work / "student-L20")
    mix, _ = build_training_mix("math", include_mawps=True)
    norms: list[float] = []  # the gradient norm each optimizer step sees (after clipping, where it clips)
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return adamw_step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    for seed in seeds:
        rows = sample_examples(mix, 64, seed)
        val, train_rows = rows[:16], rows[16:]
        for protocol in GKD_SWITCHES:
            name = get_protocol(protocol).name
            if any(r["protocol"] == name and r["seed"] == seed for r in done):
                continue
            teacher, tok = models.load_model(base)
            student, _ = models.load_model(student_dir)
            config = training.TrainConfig(method="gkd", protocol=name, temperature=5.0, epochs=1, batch_size=8,
                                          micro_batch_size=4, lr=1e-3, warmup_steps=2, max_length=96,
                                          gkd_max_new_tokens=16, seed=seed)
            start, norms[:] = time.time(), []
            result = training.train(student, tok, train_rows, config, work / f"{name}-{seed}",
                                    teacher=teachers.OnlineTeacher(teacher, tok), val_examples=val)
            done.append({"protocol": name, "seed": seed, "held_out_ce": result["final_val_loss"],
                         "before_training": result["history"][0]["val_loss"], "seconds": round(time.time() - start),
                         "grad_norms": [round(n, 4) for n in norms]})
            write_atomic(output, json.dumps(report, indent=1))
            print(done[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default="outputs")
    parser.add_argument("--output", default="benchmarks/results/protocol_ablation.json")
    parser.add_argument("--gkd-switches", action="store_true", help="train the small GKD runs (see above)")
    parser.add_argument("--work", default="outputs/protocol_ablation_gkd", help="where --gkd-switches trains")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if args.gkd_switches:
        return gkd_switches(Path(args.output), Path(args.work), args.seeds)
    studies = {half: student_runs(Path(args.outputs) / f"ablation_protocol_{half}") for half in HALVES
               if (Path(args.outputs) / f"ablation_protocol_{half}" / "results.csv").is_file()}
    if "improved" not in studies:
        raise SystemExit(f"no {args.outputs}/ablation_protocol_improved/results.csv: run the study first")
    report: dict = {"studies": {h: info for h, (_, info) in studies.items()}, "runs": [], "contrasts": {}}
    previous = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    if "gkd_switches" in previous:  # measured by --gkd-switches, not from the studies
        report["gkd_switches"] = previous["gkd_switches"]
    for half, (runs, info) in studies.items():
        sft = runs[("sft", 0.0)]
        losses = held_out_losses(Path(args.outputs) / f"ablation_protocol_{half}")
        for (method, tau), run in sorted(runs.items()):
            row = {"half": half, "protocol": info["protocol"], "method": method, "temperature": tau or None,
                   "accuracy": 100 * run["correct"].mean(), "held_out_ce": losses.get((method, tau))}
            if method != "sft":
                row["kd_minus_sft"] = paired(run, sft)
            report["runs"].append(row)

    def kd_minus_sft(half: str, method: str, temperatures: set[float]) -> pd.Series:
        """Per example, the mean over ``temperatures`` of KD correct minus SFT correct (in [-1, 1])."""
        runs = studies[half][0]
        kd = np.mean([r["correct"].astype(float) for (m, t), r in runs.items() if m == method and t in temperatures],
                     axis=0)
        return pd.Series(kd - runs[("sft", 0.0)]["correct"].astype(float), index=runs[("sft", 0.0)].index)

    def taus(runs: dict, method: str) -> set[float]:
        return {t for m, t in runs if m == method}

    contrasts = report["contrasts"]
    improved = studies["improved"][0]
    if "train_on_inputs" in studies:
        tio = studies["train_on_inputs"][0]
        contrasts["sft: train on inputs minus response only"] = paired(tio[("sft", 0.0)], improved[("sft", 0.0)])
        shared = taus(tio, "fkl") & taus(improved, "fkl")  # the temperatures both halves ran
        delta = kd_minus_sft("train_on_inputs", "fkl", shared) - kd_minus_sft("improved", "fkl", shared)
        se = delta.std(ddof=1) / math.sqrt(len(delta))
        contrasts[f"fkl KD-minus-SFT (tau {sorted(shared)}): train on inputs minus response only"] = {
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
    print(pd.DataFrame([{**{k: r[k] for k in ("half", "method", "temperature", "accuracy", "held_out_ce")},
                         "kd_minus_sft": r.get("kd_minus_sft", {}).get("difference"),
                         "p": r.get("kd_minus_sft", {}).get("pvalue")} for r in report["runs"]]).round(3).to_string())
    for name, c in contrasts.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
