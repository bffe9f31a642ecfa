"""Type-I error and power of every study-mode test, by simulating whole studies through the analysis.

Synthetic studies of the issue's design (:mod:`kd_utils.statistics.simulation`: 3 teachers x
3 students per domain, fkl / rkl / gkd at 3 temperatures sharing one SFT run per student,
13 tasks of 300 binomial examples), with and without per-example predictions, go through
``kd_utils.analysis.study_analysis``, the function the analysis notebook calls:

- under the null (no method and no temperature helps): the rejection rate of each test
  family at alpha = 0.05 (for the bootstrap intervals: how often a 95% interval misses
  the true improvement); the paper's procedure as published on the same studies;
- power: every KD run 3 points better (for the method tests, Friedman and the mixed
  model: only the first method 3 points better).

Rates pool a family's tests; their standard errors treat studies as clusters, since the
tests of one study share its runs. Prints a markdown table and writes
benchmarks/results/null_simulation.json (read by the report and the README).

    nice .venv/bin/python benchmarks/null_simulation.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
import pandas as pd

from kd_utils.io import write_atomic
from kd_utils.statistics import simulation as sim


def chunk(design: sim.Design, n_studies: int, seed: int, mixed_every: int, n_bootstrap: int,
          batch: int = 10) -> list[dict]:
    rng = np.random.default_rng(seed)
    per_study = []
    while len(per_study) < n_studies:
        size = min(batch, n_studies - len(per_study))
        per_study += sim.study_outcomes(design, rng, size, n_bootstrap=n_bootstrap,
                                        mixed_studies=-(-size // mixed_every))
    return per_study


def run(design: sim.Design, n_studies: int, seed: int, jobs: int, mixed_every: int, n_bootstrap: int) -> pd.DataFrame:
    """Rates of ``n_studies`` studies, simulated in ``jobs`` processes with independent seeds."""
    sizes = [n_studies // jobs + (i < n_studies % jobs) for i in range(jobs)]
    seeds = np.random.SeedSequence([seed, int(design.predictions), int(design.gain * 10),
                                    int(design.method_gain * 10)]).spawn(jobs)
    with ProcessPoolExecutor(jobs) as pool:
        parts = pool.map(chunk, [design] * jobs, sizes, [int(s.generate_state(1)[0]) for s in seeds],
                         [mixed_every] * jobs, [n_bootstrap] * jobs)
        per_study = [study for part in parts for study in part]
    return sim.rates(per_study).assign(predictions=design.predictions, gain=design.gain,
                                       method_gain=design.method_gain)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| test family | predictions | type I (SE) | tests | power (SE) |", "|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        power = "" if pd.isna(row["power"]) else f"{row['power']:.3f} ({row['power_se']:.3f})"
        lines.append(f"| {row['family']} | {'yes' if row['predictions'] else 'no'} | "
                     f"{row['type_I']:.3f} ({row['type_I_se']:.3f}) | {row['tests']} | {power} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=200, help="null studies without predictions")
    parser.add_argument("--studies-predictions", type=int, default=80, help="null studies with predictions")
    parser.add_argument("--power-studies", type=int, default=60, help="studies per alternative")
    parser.add_argument("--mixed-every", type=int, default=4, help="fit the mixed model in every k-th study")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--output", default=str(sim.VALIDITY_RESULTS))
    args = parser.parse_args()

    load_start, start = os.getloadavg(), time.time()
    base = sim.Design()
    runs = {
        "null, results.csv only": (sim.Design(predictions=False), args.studies),
        "null, with predictions": (base, args.studies_predictions),
        "gain 3 pp, results.csv only": (sim.Design(predictions=False, gain=3.0), args.power_studies),
        "gain 3 pp, with predictions": (sim.Design(gain=3.0), args.power_studies),
        "one method +3 pp, results.csv only": (sim.Design(predictions=False, method_gain=3.0), args.power_studies),
    }
    tables, seconds = {}, {}
    for name, (design, n) in runs.items():
        t0 = time.time()
        tables[name] = run(design, n, args.seed, args.jobs, args.mixed_every, args.bootstrap)
        seconds[name] = time.time() - t0
        print(f"{name}: {n} studies in {seconds[name]:.0f} s", flush=True)
    null = pd.concat([tables["null, results.csv only"], tables["null, with predictions"]], ignore_index=True)
    alternatives = [t for k, t in tables.items() if not k.startswith("null")]
    table = sim.validity_table(null, alternatives)
    print(markdown(table))
    write_atomic(args.output, json.dumps({
        "design": {k: v for k, v in asdict(base).items() if k != "tasks"} | {"tasks": [t for t, _ in base.tasks]},
        "alpha": 0.05,
        "studies": {name: n for name, (_, n) in runs.items()}, "seconds": seconds,
        "mixed_model_every": args.mixed_every, "bootstrap_resamples": args.bootstrap, "permutations": 999,
        "seed": args.seed, "jobs": args.jobs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(), "wall_s": time.time() - start},
        "table": table.to_dict("records"),
        "runs": {name: t.to_dict("records") for name, t in tables.items()},
    }, indent=1, default=float) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
