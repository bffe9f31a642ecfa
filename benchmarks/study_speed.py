"""A whole study's wall time, this tree against another commit: `make study`'s command, from scratch each time.

Both trees run the same params file through their own ``kd_utils.study run`` (the tree first on PYTHONPATH, its
notebooks, its kernels), each round into a fresh output directory, in alternating order (ABBA...), with the
environment `make study` has (no thread settings: torch takes every core). The load average is sampled every
30 s. Each variant's runs are summed per stage from their status.json, and the precision ``auto`` resolved to is
read from the study's precision.json.

    PYTHONPATH=. python benchmarks/study_speed.py --baseline 1146bb9 --rounds 3 \
        --output benchmarks/results/study_speed_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from kd_utils.data_files import resolve_data_dir
from kd_utils.io import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def sample_load(samples: list, stop: threading.Event) -> None:
    while not stop.wait(30.0):
        samples.append(round(os.getloadavg()[0], 2))


def run_study(tree: Path, params: str, output_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(tree), KD_DATA_DIR=str(resolve_data_dir()))
    samples: list[float] = [round(os.getloadavg()[0], 2)]
    stop = threading.Event()
    sampler = threading.Thread(target=sample_load, args=(samples, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kd_utils.study", "run", params, "--output-root", str(output_root)],
                          cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    study_dir = next(p for p in output_root.iterdir() if p.is_dir())
    stages: dict[str, float] = defaultdict(float)
    states: dict[str, int] = defaultdict(int)
    for path in study_dir.glob("runs/*/status.json"):
        status = json.loads(path.read_text())
        states[status["state"]] += 1
        stages[path.parent.name.split("-")[0]] += status.get("seconds", 0.0)
    precision = study_dir / "precision.json"
    return {"wall_s": round(wall, 1), "returncode": proc.returncode, "states": dict(states),
            "stage_seconds": {k: round(v, 1) for k, v in sorted(stages.items())},
            "precision_auto_cpu": json.loads(precision.read_text())["cpu_auto"] if precision.is_file() else "fp32",
            "load_samples": samples, "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (git rev)")
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy this tree's last study here (for benchmarks/cost_check.py)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/study_speed_default.json"))
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "kd_utils", "notebooks", "params"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    results: dict[str, list] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:  # beside the project: ../shared resolves alike
        tmp = Path(tmp)
        baseline_tree = tmp / "baseline"
        baseline_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline_tree)], input=archive, check=True)
        trees = {"baseline": baseline_tree, "current": ROOT}
        for rnd in range(args.rounds):
            order = ["baseline", "current"] if rnd % 2 == 0 else ["current", "baseline"]
            for name in order:
                out = tmp / f"{name}_{rnd}"
                result = run_study(trees[name], args.params, out)
                result["round"] = rnd
                results[name].append(result)
                print(f"round {rnd} {name}: {result['wall_s']:.0f} s, exit {result['returncode']}, "
                      f"{result['states']}, load {min(result['load_samples'])}-{max(result['load_samples'])}",
                      flush=True)
                if name == "current" and rnd == args.rounds - 1 and args.keep is not None:
                    shutil.rmtree(args.keep, ignore_errors=True)
                    shutil.copytree(next(p for p in out.iterdir() if p.is_dir()), args.keep)
                shutil.rmtree(out)
    median = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in results.items()}
    summary = {
        "benchmark": "study_speed", "params": args.params, "rounds": args.rounds, "order": "alternating (ABBA...)",
        "baseline": base, "current": head + (" (uncommitted changes)" if dirty else ""),
        "cpu_count": os.cpu_count(), "threads": "torch default (no OMP_NUM_THREADS), as make study",
        "median_wall_s": median, "range_wall_s": {n: [min(r["wall_s"] for r in rs), max(r["wall_s"] for r in rs)]
                                                  for n, rs in results.items()},
        "speedup_median": round(median["baseline"] / median["current"], 3),
        "speedup_per_round": [round(b["wall_s"] / c["wall_s"], 3)
                              for b, c in zip(results["baseline"], results["current"], strict=True)],
        "runs": results,
    }
    write_atomic(args.output, json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("median_wall_s", "range_wall_s", "speedup_median",
                                              "speedup_per_round")}, indent=1))


if __name__ == "__main__":
    main()
