"""A direct check, on many more studies, of the families whose cells in the whole-pipeline
simulation (``benchmarks/null_simulation.py``) sat above 6% with few studies: the Friedman test
over students and H4 (error consistency beyond item difficulty, teachers relabelled) in the
realistic 5 x 5 null, and "KD vs SFT" agreement in the item-difficulty 3 x 3 null (its cell of
6.0%; in the realistic nulls KD runs copy their teacher, so that family has no null there).

Studies come from ``kd_utils.statistics.simulation`` (the benchmark's tasks: 3 per domain of 300
items) and go through the functions ``kd_utils.analysis.study_analysis`` runs for these families:
``fidelity_table``, ``improvement_table`` (mean over temperatures), ``attach_fidelity``,
``study_hypothesis_tests`` and ``agreement_gain_tests``; the split estimates and bootstrap
intervals, which these families do not use, are skipped. Rates at alpha = 0.05 with standard
errors that treat studies as clusters (:func:`kd_utils.pipeline_simulation.rates`). The Friedman
test reads results alone, so its studies are drawn without predictions (the same accuracies). The
streams take turns, ``--batch`` studies at a time, and the JSON is rewritten after every batch
(``complete`` false until each reaches its ``--studies``); a rerun with the same settings resumes.

    OMP_NUM_THREADS=1 nohup nice -n 5 python benchmarks/null_families_check.py --studies 400 260 250 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kd_utils import fidelity as fd
from kd_utils import pipeline_simulation as pipeline
from kd_utils.io import write_atomic
from kd_utils.statistics import simulation as sim
from kd_utils.statistics.hypothesis_tests import agreement_gain_tests, study_hypothesis_tests
from kd_utils.statistics.improvements import attach_fidelity, improvement_table

TASKS = (("gsm8k", "math"), ("svamp", "math"), ("aqua", "math"),
         ("boolq", "commonsense"), ("piqa", "commonsense"), ("arc_e", "commonsense"))
FRIEDMAN, H4, KD_VS_SFT = ("H1 Friedman over students", "H4 stratified error consistency, teachers relabelled",
                           "H4 KD vs SFT stratified error consistency")
#: stream -> (scenario, with predictions, the families checked). The Friedman test reads results alone,
#: so its studies are drawn without predictions (same accuracies, a fraction of the time)
CHECKS = {"realistic, 5 x 5, results only": ("realistic, 5 x 5", False, (FRIEDMAN,)),
          "realistic, 5 x 5": ("realistic, 5 x 5", True, (H4,)),
          "item difficulty, 3 x 3": ("item difficulty, 3 x 3", True, (KD_VS_SFT,))}
HYPOTHESIS = {FRIEDMAN: "H1_method_friedman", H4: "H4_agreement", KD_VS_SFT: "H4_kd_vs_sft"}
ALPHA = 0.05


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def batch_outcomes(name: str, n_studies: int, seed: int, n_permutations: int) -> list[dict[str, list[int]]]:
    """Per study of one batch and family of stream ``name`` (``CHECKS``): [rejections, tests]."""
    scenario, predictions, families = CHECKS[name]
    rng = np.random.default_rng(seed)
    results, store = sim.simulate_studies(sim.scenario(scenario, tasks=TASKS, predictions=predictions), rng, n_studies)
    fidelity = fd.fidelity_table(results, store, bleu=False) if predictions else pd.DataFrame()
    tests = []
    if FRIEDMAN in families or H4 in families:
        improvements = improvement_table(results, temperature="mean")
        if len(fidelity):
            improvements = attach_fidelity(improvements, fidelity)
        tests.append(study_hypothesis_tests(improvements, n_resamples=n_permutations, seed=int(rng.integers(2**31)),
                                            bleu_domains=()))
    if KD_VS_SFT in families:
        tests.append(agreement_gain_tests(fidelity, measure="error_consistency_stratified"))
    tests = pd.concat(tests, ignore_index=True)
    out = [{} for _ in range(n_studies)]
    for family in families:
        rows = tests[(tests["hypothesis"] == HYPOTHESIS[family]) & tests["pvalue"].notna()]
        study = rows["domain"].str.rsplit("#", n=1).str[1].astype(int)
        for k in range(n_studies):
            mine = rows["pvalue"][study == k]
            out[k][family] = [int((mine < ALPHA).sum()), int(len(mine))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, nargs=3, default=[300, 70, 150], metavar=("FRIEDMAN", "H4", "KD"),
                        help="studies of each stream (CHECKS, in order)")
    parser.add_argument("--batch", type=int, default=10, help="studies per analysis pass")
    parser.add_argument("--permutations", type=int, default=199, help="Monte Carlo permutations")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" /
                                                 "null_families_check.json"))
    args = parser.parse_args()

    settings = {"tasks": [t for t, _ in TASKS], "n_examples": 300, "permutations": args.permutations,
                "batch": args.batch, "seed": args.seed, "alpha": ALPHA}
    output = Path(args.output)
    previous = json.loads(output.read_text()) if output.is_file() else {}
    keep = previous.get("settings") == settings
    targets = dict(zip(CHECKS, args.studies))
    record = {"command": "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/null_families_check.py --studies "
                         f"{' '.join(map(str, args.studies))} --batch {args.batch} "
                         f"--permutations {args.permutations} --seed {args.seed}",
              "settings": settings, "complete": False,
              "scenarios": {name: previous["scenarios"][name] if keep else
                            {"scenario": scenario, "predictions": predictions, "families": list(families),
                             "per_study": [], "seconds": 0.0, "loadavg": []}
                            for name, (scenario, predictions, families) in CHECKS.items()}}
    while True:
        todo = [n for n, s in record["scenarios"].items() if len(s["per_study"]) < targets[n]]
        if not todo:
            break
        # the stream furthest behind its target goes next, so a run stopped early has all
        name = min(todo, key=lambda n: len(record["scenarios"][n]["per_study"]) / targets[n])
        state = record["scenarios"][name]
        done = len(state["per_study"])
        size = min(args.batch, targets[name] - done)
        start = time.time()
        # each batch its own seed: a resumed run draws the same studies as an uninterrupted one
        state["per_study"] += batch_outcomes(name, size, args.seed * 1_000_003 + hash_name(name) + done,
                                             args.permutations)
        state["seconds"] += time.time() - start
        state["loadavg"].append(loadavg()[0])
        per_study = [{f: tuple(v) for f, v in s.items()} for s in state["per_study"]]
        state["rates"] = pipeline.rates(per_study).to_dict("records")
        record["complete"] = all(len(s["per_study"]) >= targets[n] for n, s in record["scenarios"].items())
        write_atomic(output, json.dumps(record, indent=1, default=float) + "\n")
        summary = "; ".join(f"{r['family']} {r['rate']:.3f} ({r['se']:.3f})" for r in state["rates"])
        print(f"{name}: {len(state['per_study'])} studies, {state['seconds']:.0f} s, load {loadavg()}: {summary}",
              flush=True)


def hash_name(name: str) -> int:
    """A stable number per scenario name (Python's hash() of a str changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) * 10_007


if __name__ == "__main__":
    main()
