"""A direct check of H1's exact sign-flip test and its interval on many studies of the realistic 5 x 5
null (``kd_utils.statistics.simulation``), without the rest of the pipeline: the benchmark's 40
studies give H1 only 80 average-task tests, too few to tell 5% from 9%.

Math domain, 3 tasks of 300 items; each student's mean over temperatures, teachers and methods of
its average-task improvement; the one-sided sign-flip test at 0.05 (with 5 students its exact level
is 1/32) and whether its interval (two one-sided 5% bounds) misses the true mean 0 (nominal 2/32).

    python benchmarks/h1_sign_flip_check.py   # writes benchmarks/results/h1_sign_flip_check.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kd_utils.io import write_atomic
from kd_utils.statistics import simulation as sim
from kd_utils.statistics.exact import sign_flip_test
from kd_utils.statistics.improvements import improvement_table

TASKS = (("gsm8k", "math"), ("svamp", "math"), ("aqua", "math"))
STUDIES, SEED = 800, 1


def main() -> None:
    design = sim.scenario("realistic, 5 x 5", tasks=TASKS, predictions=False)
    rng = np.random.default_rng(SEED)
    rejected, missed = [], []
    for _ in range(STUDIES):
        results, _ = sim.simulate_study(design, rng)
        improvements = improvement_table(results, temperature="mean")
        units = improvements[improvements["task"] == "average"].groupby("student")["improvement"].mean()
        res = sign_flip_test(units.to_numpy(), "greater")
        rejected.append(res["pvalue"] < 0.05)
        missed.append(not res["ci_low"] <= 0.0 <= res["ci_high"])
    out = {"scenario": "realistic, 5 x 5", "domain": "math", "studies": STUDIES, "seed": SEED,
           "h1_rejections": float(np.mean(rejected)), "se": float(np.std(rejected) / np.sqrt(STUDIES)),
           "exact_level": 1 / 32, "interval_miss": float(np.mean(missed)),
           "se_miss": float(np.std(missed) / np.sqrt(STUDIES)), "nominal_miss": 2 / 32}
    path = Path(__file__).resolve().parent / "results" / "h1_sign_flip_check.json"
    write_atomic(path, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
