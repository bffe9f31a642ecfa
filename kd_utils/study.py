"""Run a whole study: plan its runs, execute each run's notebook with papermill, collect results.csv, analyse.

    python -m kd_utils.study run params/default.yaml [--dry-run] [--executor local|slurm] [--only STAGE]
    python -m kd_utils.study verify params/default.yaml [--output-root DIR]

Run graph (:mod:`kd_utils.plan`): teacher fine-tune -> teacher cache -> student SFT / KD runs -> evaluation of
the base model, the teacher and every student -> results.csv -> analysis notebook -> report.html. Run ids are
content hashes of a run's resolved parameters, so a re-run skips completed runs and redoes incomplete ones.
A finished run is skipped only while the outputs it recorded (size and sha256, :mod:`kd_utils.run_records`)
verify; a run whose outputs are missing or changed is redone from scratch, with every finished run downstream
of it, and the runner says which file. ``verify`` checks a whole study that way without running anything.
A failing run is recorded with its error, its dependents are skipped (on Slurm: cancelled), independent runs
go on, and the exit code is non-zero. One submission of a study at a time (a lock file in the study
directory); Slurm job ids are recorded in each run's status, so a rerun waits for jobs still queued or running
instead of submitting them again. The executors are in :mod:`kd_utils.executors`; their names, and the plan's,
are also importable from here, as before the modules were split.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kd_utils.constants import RESULT_COLUMNS, STAGES
from kd_utils.cost_table import default_table_path, load_table
from kd_utils.dry_run import format_estimate
from kd_utils.executors import (  # noqa: F401
    NOTEBOOKS,
    PROJECT_ROOT,
    SLURM_ACTIVE,
    LocalExecutor,
    RunJob,
    SubmititExecutor,
    execute_run,
    slurm_states,
)
from kd_utils.io import write_atomic
from kd_utils.params import ParamsError, load_study
from kd_utils.plan import (  # noqa: F401
    STUDY_PREFIX,
    Run,
    TeacherRun,
    analysis_run,
    cache_run,
    plan,
    resolve,
)
from kd_utils.precision import AUTO_ENV
from kd_utils.precision import resolve as resolve_precision
from kd_utils.predictions import CORRECTNESS_FILE, export_correctness
from kd_utils.run_records import (
    UNVERIFIABLE,
    clear_run_dir,
    output_problems,
    read_status,
    write_status,
)

# ---- what is on disk: statuses, their outputs verified -------------------------------------

def check_runs(runs: list[Run], study_dir: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every run's status from its directory, a finished run's outputs verified (``runs`` in plan order).

    A finished run whose outputs are missing or changed, or that is downstream of such a run (it was made from
    what is redone), is pending again, the reason in its status' ``redo``; a run finished before outputs were
    recorded stays done, marked ``unverified``. ``known``: statuses of upstream runs outside ``runs``.
    """
    statuses = dict(known or {})
    for run in runs:
        status = read_status(study_dir / "runs" / run.id)
        if status["state"] == "done":
            problems = output_problems(study_dir / "runs" / run.id, status)
            upstream = next((d for d in run.deps if "redo" in statuses.get(d, {})), None)
            if problems:
                status = {**status, "state": "pending", "redo": "; ".join(problems)}
            elif upstream:
                status = {**status, "state": "pending", "redo": f"upstream run {upstream} is redone"}
            elif problems is None:
                status = {**status, "unverified": True}
        statuses[run.id] = status
    return statuses


def unverified_note(statuses: dict[str, dict]) -> str | None:
    """One line for the runs trusted without verification (finished before outputs were recorded)."""
    n = sum(bool(s.get("unverified")) for s in statuses.values())
    return f"note: {n} finished run{'s' * (n != 1)} {UNVERIFIABLE} (trusted as they are)" if n else None


def _dependents(runs: list[Run], failed: str) -> list[str]:
    """Every run downstream of ``failed`` (transitively), in plan order."""
    down = {failed}
    for run in runs:  # plan order: dependencies come first
        if any(d in down for d in run.deps):
            down.add(run.id)
    down.discard(failed)
    return [r.id for r in runs if r.id in down]


def execute(runs: list[Run], study_dir: Path, executor, statuses: dict[str, dict] | None = None) -> dict[str, dict]:
    """Execute the runs not yet done, respecting dependencies; returns every run's final status.

    ``statuses``: the known (:func:`check_runs`) states of runs, also of runs outside ``runs`` (dependencies of an
    --only selection); runs without one are read and verified here. A run to redo because its outputs changed
    is said so and starts from an empty directory. Runs whose Slurm job an earlier submission queued are waited
    for, not submitted again.
    """
    statuses = dict(statuses or {})
    statuses = check_runs([r for r in runs if r.id not in statuses], study_dir, statuses)
    todo = [r for r in runs if statuses[r.id]["state"] != "done"]
    for run in todo:
        if "redo" in statuses[run.id]:
            tqdm.write(f"[redo] {run.label} ({run.id}): {statuses[run.id]['redo']}")
            clear_run_dir(study_dir / "runs" / run.id)
    scheduled = {r.id for r in todo}
    by_id = {r.id: r for r in runs}
    jobs: dict[str, object] = {}
    futures: dict[object, Run] = {}
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    pending = []
    for run in todo:
        job = executor.attach(statuses[run.id], study_dir)
        # a run failed or skipped last time is pending now: its dependents wait for this attempt
        statuses[run.id] = {**statuses[run.id], "state": "pending"}
        if job is None:
            pending.append(run)
        else:
            jobs[run.id] = job
            futures[job] = run
            tqdm.write(f"[waiting] {run.label} ({run.id}): Slurm job {job.job_id} of an earlier submission")
    capacity = getattr(executor, "capacity", None)
    while pending or futures:
        submitted = True
        while submitted:  # again after a submission: with Slurm dependencies a whole chain queues in one go
            submitted = False
            # evaluations first, so each model is evaluated as soon as it exists (a study cut short keeps pairs)
            for run in sorted(pending, key=lambda r: r.stage != "eval"):
                dep_states = [statuses[d]["state"] for d in run.deps]
                blocked = [d for d, s in zip(run.deps, dep_states) if s != "done" and d not in scheduled]
                if any(s in ("failed", "skipped") for s in dep_states) or blocked:
                    statuses[run.id] = {"state": "skipped", "label": run.label,
                                        "error": f"dependency {(blocked or run.deps)[0]} failed or was not run"}
                    write_status(study_dir / "runs" / run.id, **statuses[run.id])
                    pending.remove(run)
                    bar.update(1)
                    continue
                ready = all(s == "done" for s in dep_states) or (executor.submits_with_dependencies and all(
                    d in jobs or s == "done" for d, s in zip(run.deps, dep_states)))
                if ready and (capacity is None or len(futures) < capacity):
                    jobs[run.id] = executor.submit(run, study_dir, [jobs[d] for d in run.deps if d in jobs])
                    futures[jobs[run.id]] = run
                    pending.remove(run)
                    submitted = True
                    bar.set_postfix_str(run.label[:60])
        if not futures:
            continue
        job = executor.wait_any(list(futures))
        run = futures.pop(job)
        try:
            statuses[run.id] = executor.result(job)
        except Exception as err:  # noqa: BLE001 - e.g. a Slurm job cancelled, or preempted and not requeued
            failed_dep = next((d for d in run.deps if statuses[d]["state"] in ("failed", "skipped")), None)
            statuses[run.id] = ({"state": "skipped", "label": run.label, "error": f"dependency {failed_dep} failed"}
                                if failed_dep else  # Slurm cancelled it (--kill-on-invalid-dep) before we did
                                {"state": "failed", "label": run.label, "error": f"{type(err).__name__}: {err}"})
            write_status(study_dir / "runs" / run.id, **statuses[run.id])
        bar.update(1)
        tqdm.write(f"[{statuses[run.id]['state']}] {run.label} ({run.id})")
        if statuses[run.id]["state"] == "failed":  # its queued dependents would wait forever: cancel them
            for rid in _dependents(runs, run.id):
                dependent = jobs.get(rid)
                if dependent in futures:
                    executor.cancel(dependent)
                    del futures[dependent]
                    statuses[rid] = {"state": "skipped", "label": by_id[rid].label,
                                     "error": f"dependency {run.id} ({run.label}) failed"}
                    write_status(study_dir / "runs" / rid, **statuses[rid])
                    bar.update(1)
    bar.close()
    return statuses


class StudyLocked(RuntimeError):
    """Another submission of the same study holds its lock."""


def lock_study(study_dir: Path):
    """An exclusive lock on the study directory for this process's lifetime (released when it exits,
    also when it is killed); raises StudyLocked, naming the holder, when another submission has it."""
    handle = open(study_dir / ".runner.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StudyLocked(f"study {study_dir} is being run by another submission ({holder}); wait for it to "
                          f"finish (its jobs are not submitted twice), or stop it and run again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


# ---- results and report -------------------------------------------------------------------

def count_model_parameters(path: str) -> int | None:
    """Parameters of a local safetensors model directory (tied output weights counted once)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key != "lm_head.weight":  # tied to the embeddings in the models we build
                    numel = 1
                    for dim in f.get_slice(key).get_shape():
                        numel *= dim
                    total += numel
    return total


class OutputsChanged(RuntimeError):
    """A finished evaluation's outputs no longer match what it recorded: nothing may read them."""


def results_table(params: dict, runs: list[Run], statuses: dict[str, dict], study_dir: Path
                  ) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """results.csv's rows (the design card's contract) from every finished evaluation run, each run's outputs
    verified before they are read, and the parameters of each local model directory evaluated."""
    rows, sizes = [], {}
    for run in runs:
        if run.stage != "eval" or statuses[run.id]["state"] != "done":
            continue
        if problems := output_problems(study_dir / "runs" / run.id, statuses[run.id]):
            raise OutputsChanged(f"{run.label} ({run.id}): {'; '.join(problems)}; run the study again to redo it")
        metrics = pd.read_csv(study_dir / "runs" / run.id / "metrics.csv")
        for rec in metrics.to_dict("records"):
            # precision stays empty for a metrics.csv from before it was recorded (fp32 on a CPU, bf16 weights on a GPU)
            rows.append({"study": params["study"], "run_id": run.id, "temperature": None, "noise_sigma": 0.0,
                         "protocol": run.parameters["protocol"], "scoring": "generate", "loglik_metric": None,
                         "precision": None, **run.meta, **rec})
        model_dir = resolve(run.parameters["model"], study_dir)
        if run.meta["model"] not in sizes and Path(model_dir).is_dir():
            sizes[run.meta["model"]] = count_model_parameters(model_dir)
    results = pd.DataFrame(rows)[list(RESULT_COLUMNS)] if rows else pd.DataFrame(columns=list(RESULT_COLUMNS))
    return results, sizes


def collect_results(params: dict, runs: list[Run], statuses: dict[str, dict], study_dir: Path) -> pd.DataFrame:
    """results.csv, models.csv and the per-example correctness export from every finished evaluation run."""
    results, sizes = results_table(params, runs, statuses, study_dir)
    write_atomic(study_dir / "results.csv", results.to_csv(index=False))
    sizes_df = pd.DataFrame([{"model": m, "n_params": s} for m, s in sizes.items() if s is not None])
    write_atomic(study_dir / "models.csv", sizes_df.to_csv(index=False))
    export_correctness(study_dir / "runs", results["run_id"].unique(), study_dir / CORRECTNESS_FILE)
    return results


def pin_auto_precision(study_dir: Path) -> str:
    """Fix what precision ``auto`` means on a CPU for this study, once, in ``<study>/precision.json``.

    A study's runs are compared with each other, so they must not mix precisions: a study resumed on another
    machine, or after ``auto`` learned bf16, keeps the meaning it started with. A study that has run before
    the file existed ran fp32 on a CPU, and keeps fp32. The value reaches every run's kernel through
    ``KD_AUTO_PRECISION``; runs record what they resolved (train_summary.json, metrics.csv, results.csv).
    """
    path = study_dir / "precision.json"
    if path.is_file():
        pinned = json.loads(path.read_text())["cpu_auto"]
    else:
        started = any((study_dir / "runs").glob("*/status.json"))
        pinned = "fp32" if started else resolve_precision("auto", "cpu")
        write_atomic(path, json.dumps({"cpu_auto": pinned, "why": "pre-existing runs (fp32)" if started else
                                       "this machine's CPU at the study's first run"}, indent=1))
    os.environ[AUTO_ENV] = pinned
    return pinned


def study_report(analysis_html: Path) -> str:
    """The study's report.html: the analysis run's HTML with its links to the run's files (CSVs,
    provenance.json) pointed at their copies in ``analysis/``, which a committed study keeps without ``runs/``."""
    prefix = f'href="runs/{analysis_html.parent.name}/'
    return analysis_html.read_text(encoding="utf-8").replace(prefix, 'href="analysis/')


def keep_analysis_files(run_dir: Path, target: Path) -> None:
    """The analysis run's CSVs, provenance.json and figures (PNG), copied beside results.csv (what a committed
    study keeps)."""
    (target / "figures").mkdir(parents=True, exist_ok=True)
    for old in [*target.glob("*.csv"), *target.glob("figures/*.png")]:
        old.unlink()  # files of an earlier analysis that this one did not write
    for path in [*sorted(run_dir.glob("*.csv")), run_dir / "provenance.json"]:
        if path.is_file():
            write_atomic(target / path.name, path.read_bytes())
    for path in sorted(run_dir.glob("figures/*.png")):
        write_atomic(target / "figures" / path.name, path.read_bytes())


def study_directory(params: dict, output_root: str | Path | None = None) -> Path:
    root = Path(output_root or params["output_dir"])
    return (root if root.is_absolute() else PROJECT_ROOT / root) / params["study"]


def run_study(params_path: str | Path, executor_name: str | None = None, dry_run: bool = False,
              only: str | None = None, output_root: str | Path | None = None) -> int:
    """Plan and execute a study; returns the process exit code (0 when every run succeeded)."""
    params = load_study(params_path)
    study_dir = study_directory(params, output_root)
    runs = plan(params)
    if only is not None and only not in STAGES:
        raise ParamsError("--only", [f"unknown stage {only!r}; expected one of {', '.join(STAGES)}"])
    if dry_run:
        statuses = check_runs(runs, study_dir)
        print(f"study {params['study']}: {len(runs)} runs (+ analysis) into {study_dir}")
        for r in runs:
            state = "redo" if "redo" in statuses[r.id] else statuses[r.id]["state"]
            print(f"  {state:8s} {r.id:22s} {r.label} [protocol {r.parameters.get('protocol', params['protocol'])}]"
                  + (f"  <- {', '.join(r.deps)}" if r.deps else "")
                  + (f"\n           redo: {statuses[r.id]['redo']}" if "redo" in statuses[r.id] else ""))
        if note := unverified_note(statuses):
            print(note)
        print(format_estimate(params, runs, load_table(), default_table_path()))
        return 0
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_study(study_dir)  # noqa: F841 - held until this process ends
    except StudyLocked as err:
        print(err, file=sys.stderr)
        return 3
    write_atomic(study_dir / "params.resolved.json", json.dumps(params, indent=1))
    print(f"precision auto on a CPU: {pin_auto_precision(study_dir)} (kept in {study_dir / 'precision.json'})")
    name = executor_name or params["execution"]["executor"]
    execution = params["execution"]
    executor = (LocalExecutor(execution["parallel"], execution["threads_per_run"]) if name == "local" else
                SubmititExecutor(study_dir, "slurm" if name == "slurm" else "local", execution["slurm"],
                                 execution["slurm_resources"]))
    try:
        statuses = check_runs(runs, study_dir)  # read under the lock: no other submission changes them now
        if note := unverified_note(statuses):
            print(note)
        selected = [r for r in runs if only in (None, r.stage)]
        statuses = execute(selected, study_dir, executor, statuses)
        if only in (None, "analysis"):
            try:
                results = collect_results(params, runs, statuses, study_dir)
            except OutputsChanged as err:  # changed while the study ran: the analysis must not read them
                print(f"not analysed: {err}", file=sys.stderr)
                return 1
            analysis = analysis_run(params, results)
            statuses = execute([analysis], study_dir, executor, statuses)
            html = study_dir / "runs" / analysis.id / "analysis.html"
            if statuses[analysis.id]["state"] == "done":
                keep_analysis_files(study_dir / "runs" / analysis.id, study_dir / "analysis")  # what the report links
                write_atomic(study_dir / "report.html", study_report(html))
    finally:
        executor.close()
    failed = {rid: s for rid, s in statuses.items() if s["state"] in ("failed", "skipped")}
    done = sum(s["state"] == "done" for s in statuses.values())
    print(f"\n{params['study']}: {done} runs done, {len(failed)} failed or skipped; outputs in {study_dir}")
    for rid, s in failed.items():
        print(f"  {s['state']}: {s.get('label', rid)} ({rid}): {s.get('error', '')}")
    if (study_dir / "report.html").is_file():
        print(f"report: {study_dir / 'report.html'}")
    return 1 if failed else 0


def analysis_problems(analysis: Run, study_dir: Path) -> list[str]:
    """What does not verify of the analysis of the current results, and of report.html copied from it."""
    status = check_runs([analysis], study_dir)[analysis.id]
    if "redo" in status:
        return [f"{analysis.label} ({analysis.id}): {status['redo']}"]
    html, report_html = study_dir / "runs" / analysis.id / "analysis.html", study_dir / "report.html"
    done = status["state"] == "done" and report_html.is_file()
    if done and report_html.read_text(encoding="utf-8") != study_report(html):
        return ["report.html: differs from its analysis run's analysis.html (running the study again rewrites it)"]
    return []


def verify_study(params_path: str | Path, output_root: str | Path | None = None) -> int:
    """Check a study on disk without running anything: every finished run's outputs against the sizes and
    sha256 it recorded, results.csv against the finished evaluations, and the analysis of those results.
    Prints what does not verify; returns 0 when everything verifies, 1 otherwise."""
    params = load_study(params_path)
    study_dir = study_directory(params, output_root)
    if not (study_dir / "runs").is_dir():
        print(f"no study at {study_dir} (no runs directory); is --output-root right?", file=sys.stderr)
        return 2
    runs = plan(params)
    statuses = check_runs(runs, study_dir)
    problems = [f"{r.label} ({r.id}): {statuses[r.id]['redo']}" for r in runs if "redo" in statuses[r.id]]
    results_path = study_dir / "results.csv"
    if results_path.is_file():
        try:
            results, _ = results_table(params, runs, statuses, study_dir)
        except (OSError, ValueError) as err:  # e.g. an unverifiable run's metrics.csv missing or torn
            problems.append(f"results.csv: cannot be rebuilt from the finished evaluations ({err})")
        else:
            if results.to_csv(index=False).encode() != results_path.read_bytes():  # as collect_results wrote it
                problems.append("results.csv: differs from the finished evaluations' metrics.csv (edited, or runs "
                                "finished or changed since it was written; running the study again rewrites it)")
            problems += analysis_problems(analysis_run(params, results), study_dir)
    done = sum(statuses[r.id]["state"] == "done" for r in runs)
    verified = done - sum(bool(statuses[r.id].get("unverified")) for r in runs)
    print(f"study {params['study']} in {study_dir}: {done} of {len(runs)} runs finished, {verified} of them verified"
          + ("" if results_path.is_file() else "; no results.csv yet"))
    if note := unverified_note(statuses):
        print(note)
        for r in runs:
            if statuses[r.id].get("unverified"):
                print(f"  not verifiable: {r.label} ({r.id})")
    if problems:
        print(f"{len(problems)} problem{'s' * (len(problems) != 1)} (running the study again redoes these runs and "
              "rewrites these files):")
        for problem in problems:
            print(f"  {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_utils.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a study")
    run.add_argument("params", help="a study YAML file, e.g. params/default.yaml")
    run.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    run.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default=None)
    run.add_argument("--only", choices=STAGES, default=None, help="run only this stage's runs")
    run.add_argument("--output-root", default=None, help="override the params' output_dir")
    check = sub.add_parser("verify", help="check a study's finished runs and results.csv against the hashes "
                                          "they recorded, running nothing (exit 0: everything verifies)")
    check.add_argument("params", help="the study's YAML file")
    check.add_argument("--output-root", default=None, help="override the params' output_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return verify_study(args.params, args.output_root)
        return run_study(args.params, args.executor, args.dry_run, args.only, args.output_root)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
