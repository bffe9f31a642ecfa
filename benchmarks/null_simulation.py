"""Type-I error and power of every study-mode test family, per named scenario, by simulating whole
studies through the analysis the notebook runs.

Every scenario of ``kd_utils.statistics.simulation.SCENARIOS`` (logistic item difficulty shared
by all models, teacher effects on the gain unrelated to teacher accuracy, method-by-student
effects centred at 0, training-run noise of every SFT and KD run, agreement and BLEU carrying
teacher effects; crossed 3 x 3 and 5 x 5 designs and the paper's unbalanced one; the sharp
null kept as one scenario; power scenarios beside them) is simulated with per-example
predictions and put through ``kd_utils.analysis.study_analysis``. Per family: the rejection
rate at alpha = 0.05 (null scenarios: type I; power scenarios: power), for the intervals how
often they miss the truth, with standard errors that treat studies as clusters (the tests of
one study share its runs). Families whose own null a scenario does not satisfy (per-run
McNemar tests when runs differ by training deviations) are left out of that scenario.

Cheap Monte Carlo settings keep it near 40 minutes of one core: 3 tasks per domain of 300
items, 199 permutations (1000 bootstrap resamples: with 200 the percentile intervals miss
the truth about 7% of the time in the paper's design, a Monte Carlo artefact). The JSON is rewritten after every
scenario and a rerun with the same settings skips the scenarios it already holds.

    nohup nice .venv/bin/python benchmarks/null_simulation.py --jobs 2 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from kd_utils import pipeline_simulation as pipeline
from kd_utils.io import write_atomic
from kd_utils.statistics import simulation as sim

TASKS = (("gsm8k", "math"), ("svamp", "math"), ("aqua", "math"),
         ("boolq", "commonsense"), ("piqa", "commonsense"), ("arc_e", "commonsense"))
MAX_TYPE_I = 0.06


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").is_file() \
        else list(os.getloadavg())


def markdown(table: pd.DataFrame) -> str:
    """The README's table: one column per scenario, a row per family, type I (SE)."""
    nulls = table[~table["scenario"].str.startswith("power")]
    # families whose null a scenario does not satisfy are left out (kd_utils.pipeline_simulation.not_under_the_null)
    excluded = {(s, f) for s in nulls["scenario"].unique() for f in pipeline.not_under_the_null(sim.scenario(s))}
    nulls = nulls[[(s, f) not in excluded for s, f in zip(nulls["scenario"], nulls["family"])]]
    wide = nulls.assign(cell=[f"{r:.3f} ({s:.3f})" for r, s in zip(nulls["rate"], nulls["se"])]).pivot_table(
        index="family", columns="scenario", values="cell", aggfunc="first", sort=False).fillna("")
    order = [f for f in pipeline.FAMILIES if f in wide.index]
    wide = wide.loc[order, [s for s in sim.SCENARIOS if s in wide.columns]]
    lines = ["| test family | " + " | ".join(wide.columns) + " |", "|---" * (len(wide.columns) + 1) + "|"]
    lines += [f"| {family} | " + " | ".join(row) + " |" for family, row in wide.iterrows()]
    return "\n".join(lines)


def one_scenario(name: str, args: argparse.Namespace) -> dict:
    """Rates of one scenario's studies, with its time and the machine's load around it."""
    design = sim.scenario(name, tasks=TASKS)
    large = len(design.teachers) > 3 or design.pairs is not None
    n = args.power_studies if name.startswith("power") else args.studies_large if large else args.studies
    load_start, start = loadavg(), time.time()
    rates = pipeline.simulate(design, n, seed=args.seed, batch=10, n_bootstrap=args.bootstrap,
                         n_permutations=args.permutations)
    return {"description": sim.SCENARIOS[name][1], "design": sim.SCENARIOS[name][0], "studies": n,
            "seconds": time.time() - start, "loadavg_start": load_start, "loadavg_end": loadavg(),
            "rates": rates.to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=60, help="studies per null scenario with a 3 x 3 design")
    parser.add_argument("--studies-large", type=int, default=40,
                        help="studies per null scenario of the 5 x 5 and paper designs")
    parser.add_argument("--power-studies", type=int, default=16, help="studies per power scenario")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--permutations", type=int, default=199, help="Monte Carlo permutations")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--jobs", type=int, default=1, help="scenarios simulated at once")
    parser.add_argument("--scenarios", nargs="*", default=list(sim.SCENARIOS))
    parser.add_argument("--output", default=str(sim.VALIDITY_RESULTS))
    args = parser.parse_args()

    settings = {"tasks": [t for t, _ in TASKS], "n_examples": 300, "bootstrap_resamples": args.bootstrap,
                "permutations": args.permutations, "seed": args.seed, "alpha": 0.05}
    output = Path(args.output)
    previous = json.loads(output.read_text()) if output.is_file() else {}
    done = previous.get("scenarios", {}) if previous.get("settings") == settings else {}
    record = {"command": "python benchmarks/null_simulation.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                  if k not in ("scenarios", "output") and v is not None),
              "settings": settings, "scenarios": done, "machine": previous.get("machine", {})
              if done else {}}
    todo = [name for name in args.scenarios if name not in done]
    for name in set(args.scenarios) - set(todo):
        print(f"{name}: kept from {output}", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one_scenario, name, args): name for name in todo}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            record["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "jobs": args.jobs}
            table = pd.DataFrame([r | {"scenario": s} for s, v in done.items() for r in v["rates"]])
            record["table"] = table[sim.VALIDITY_COLUMNS].to_dict("records")
            write_atomic(output, json.dumps(record, indent=1, default=float) + "\n")
            print(f"{futures[future]}: {done[futures[future]]['studies']} studies in "
                  f"{done[futures[future]]['seconds']:.0f} s, load {loadavg()}", flush=True)
    table = pd.DataFrame(record["table"])
    print(markdown(table))
    valid = table[~table["scenario"].str.startswith("power") & ~table["family"].str.startswith(pipeline.COMPARISONS)]
    valid = valid[[f not in pipeline.not_under_the_null(sim.scenario(s)) for s, f in zip(valid["scenario"],
                                                                                    valid["family"])]]
    over = valid[valid["rate"] > MAX_TYPE_I]
    print("families above 6%:", "none" if over.empty else over.to_string())


if __name__ == "__main__":
    main()
