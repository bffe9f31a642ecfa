"""Where the fixed cost of a study run goes: papermill's kernel, the imports, the model load, the HTML export; and
what is left of it in a warm kernel (started ahead, its imports done while the run before executed).

A study run (``kd_utils.study.execute_run``) executes its notebook in a fresh kernel through papermill and
then renders the executed notebook to HTML. This times, per round, papermill notebooks that stop after
each phase (so each phase's cost is a difference of medians), then the HTML export of the fullest one,
both in the calling process (as the local executor pays it: nbconvert already imported) and in a fresh
process (as a Slurm job pays it). Phases are interleaved, their order alternating from round to round;
the load average is recorded (a shared machine inflates every number, the shares are what to read).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/run_overhead.py --rounds 3 \
        --output benchmarks/results/run_overhead.json
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

import nbformat
import papermill as pm

from kd_utils.executors import KERNEL_READY_TIMEOUT_S, notebook_kernels
from kd_utils.io import write_atomic
from kd_utils.report import notebook_to_html

ROOT = Path(__file__).resolve().parents[1]
PHASES = {
    "kernel": "pass",
    "imports": "import pandas as pd\nfrom kd_utils import evaluation, models, plots, tasks, teacher_cache, training",
    "model_load": "model, tokenizer = models.load_model(models.EMBEDDED_MODEL)",
    "plot": "pd.DataFrame({'step': [1, 2], 'loss': [2.0, 1.0]}).plot(x='step', y='loss');",
}


def notebook(upto: int) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_markdown_cell("# Fixed cost of a run")]
    cells += [nbformat.v4.new_code_cell(code) for code in list(PHASES.values())[:upto + 1]]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a directory holding another kd_utils (e.g. `git archive main kd_utils | tar -x -C DIR`): "
                             "its imports phase is timed too, interleaved, for a before / after")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/run_overhead.json"))
    args = parser.parse_args()
    names = list(PHASES)
    times: dict[str, list[float]] = {f"upto_{n}": [] for n in names}
    if args.baseline is not None:
        times["baseline_upto_imports"] = []
    times.update(warm_kernel_ready=[], warm_upto_plot=[], html_in_process=[], html_fresh_process=[])
    kernels = notebook_kernels(spares=0)
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(len(names)):
            nbformat.write(notebook(i), str(tmp / f"upto_{names[i]}.ipynb"))
        notebook_to_html(tmp / "upto_kernel.ipynb", tmp / "warm.html")  # nbconvert imported, as in a study process
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                pm.execute_notebook(str(tmp / f"upto_{name}.ipynb"), str(tmp / f"done_{name}.ipynb"), parameters={},
                                    cwd=str(ROOT), progress_bar=False, kernel_name="python3")
                times[f"upto_{name}"].append(time.perf_counter() - start)
                # a kernel imports from its cwd first, then PYTHONPATH
                if name == "imports" and args.baseline is not None:
                    here = os.environ.get("PYTHONPATH", "")
                    os.environ["PYTHONPATH"] = str(args.baseline.resolve())
                    try:
                        start = time.perf_counter()
                        pm.execute_notebook(str(tmp / "upto_imports.ipynb"), str(tmp / "done_baseline.ipynb"),
                                            parameters={}, cwd=str(args.baseline.resolve()), progress_bar=False,
                                            kernel_name="python3")
                        times["baseline_upto_imports"].append(time.perf_counter() - start)
                    finally:
                        os.environ["PYTHONPATH"] = here
            # the same fullest notebook as the local runner now executes it: in a kernel started ahead, whose
            # start-up imports overlapped the run before (their time is recorded, not counted)
            start = time.perf_counter()
            kernel = kernels.take()
            try:
                kernel.wait_ready(KERNEL_READY_TIMEOUT_S)
                times["warm_kernel_ready"].append(time.perf_counter() - start)
                start = time.perf_counter()
                pm.execute_notebook(str(tmp / f"upto_{names[-1]}.ipynb"), str(tmp / "done_warm.ipynb"),
                                    parameters={}, cwd=str(ROOT), progress_bar=False, kernel_name="python3",
                                    km=kernel)
                times["warm_upto_plot"].append(time.perf_counter() - start)
            finally:
                kernel.close()
            executed = tmp / f"done_{names[-1]}.ipynb"
            start = time.perf_counter()
            notebook_to_html(executed, tmp / "out.html")
            times["html_in_process"].append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; from kd_utils.report import notebook_to_html; "
                            "notebook_to_html(sys.argv[1], sys.argv[2])", str(executed), str(tmp / "fresh.html")],
                           check=True, cwd=ROOT)
            times["html_fresh_process"].append(time.perf_counter() - start)
            print(f"round {rnd}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    kernels.close()
    load["end"] = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    phases = {"kernel_start": med["upto_kernel"]}
    for prev, name in zip(names, names[1:]):
        phases[name] = med[f"upto_{name}"] - med[f"upto_{prev}"]
    phases["html_export_in_process"] = med["html_in_process"]
    total = med[f"upto_{names[-1]}"] + med["html_in_process"]
    if args.baseline is not None:
        phases["imports_baseline"] = med["baseline_upto_imports"] - med["upto_kernel"]
    warm_total = med["warm_upto_plot"] + med["html_in_process"]
    result = {"benchmark": "run_overhead", "rounds": args.rounds, "baseline": str(args.baseline), "loadavg": load,
              "cpu_count": os.cpu_count(),
              "median_seconds": med, "phase_seconds": phases, "total_local_executor_s": total,
              "total_warm_kernel_s": warm_total, "warm_vs_cold": total / warm_total,
              "phase_share": {k: v / total for k, v in phases.items() if k != "imports_baseline"}, "runs": times,
              "note": "shared machine: see loadavg; phases are differences of medians of interleaved notebooks"}
    print(json.dumps({k: result[k] for k in ("phase_seconds", "phase_share", "total_local_executor_s",
                                             "total_warm_kernel_s", "warm_vs_cold", "loadavg")},
                     indent=1))
    write_atomic(args.output, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
