"""A whole study's wall time, this tree against another commit: `make study`'s command, from scratch each time.

Both trees run the same params file through their own ``kd_utils.study run`` (the tree first on PYTHONPATH, its
notebooks, its kernels), each round into a fresh output directory, in alternating order (ABBA...), with the
environment `make study` has (no thread settings: torch takes every core). The load average is sampled every
30 s, and the memory of the study's process tree (the runner, its kernels; summed proportional set size, so pages
shared between processes count once) every 2 s, for its peak. Each variant's runs are summed per stage from
their status.json, and the precision ``auto`` resolved to is read from the study's precision.json.

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

import psutil

from kd_utils.data_files import resolve_data_dir
from kd_utils.io import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def tree_pss(pid: int) -> int:
    """Bytes of proportional set size of a process and its descendants (0 for those that ended meanwhile)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def sample_machine(pid: int, load: list, peak: list, stop: threading.Event) -> None:
    """Load average every 30 s into ``load``; the process tree's peak PSS (bytes) in ``peak[0]`` every 2 s."""
    tick = 0
    while not stop.wait(2.0):
        tick += 1
        peak[0] = max(peak[0], tree_pss(pid))
        if tick % 15 == 0:
            load.append(round(os.getloadavg()[0], 2))


def run_study(tree: Path, params: str, output_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(tree), KD_DATA_DIR=str(resolve_data_dir()))
    samples: list[float] = [round(os.getloadavg()[0], 2)]
    peak = [0]
    stop = threading.Event()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kd_utils.study", "run", params, "--output-root",
                                 str(output_root)], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                text=True)
        sampler = threading.Thread(target=sample_machine, args=(proc.pid, samples, peak, stop), daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        stderr.seek(0)
        stderr_text = stderr.read()
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
            "peak_pss_gib": round(peak[0] / 2**30, 2), "load_samples": samples,
            "stderr_tail": stderr_text[-2000:] if proc.returncode else ""}


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
                load = result["load_samples"]
                print(f"round {rnd} {name}: {result['wall_s']:.0f} s, exit {result['returncode']}, "
                      f"{result['states']}, peak {result['peak_pss_gib']} GiB, load {min(load)}-{max(load)}",
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
        "peak_pss_gib": {n: max(r["peak_pss_gib"] for r in rs) for n, rs in results.items()},
        "speedup_per_round": [round(b["wall_s"] / c["wall_s"], 3)
                              for b, c in zip(results["baseline"], results["current"], strict=True)],
        "runs": results,
    }
    write_atomic(args.output, json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("median_wall_s", "range_wall_s", "speedup_median",
                                              "speedup_per_round")}, indent=1))


if __name__ == "__main__":
    main()
