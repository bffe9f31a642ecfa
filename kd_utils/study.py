"""Run a whole study: expand the params grid into runs, execute each run's notebook with papermill.

    python -m kd_utils.study run params/default.yaml [--dry-run] [--executor local|slurm] [--only STAGE]

Run graph: teacher fine-tune -> teacher cache -> student SFT / KD runs -> evaluation of the base model, the
teacher and every student -> results.csv -> analysis notebook -> report.html. Run ids are
content hashes of a run's resolved parameters (upstream runs enter by id), so a re-run skips
completed runs and redoes incomplete ones. A failing run is recorded with its error, its
dependents are skipped (on Slurm: cancelled), independent runs go on, and the exit code is non-zero.
One submission of a study at a time (a lock file in the study directory); Slurm job ids are
recorded in each run's status, so a rerun waits for jobs still queued or running instead of
submitting them again.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kd_utils import costs
from kd_utils.constants import RESULT_COLUMNS, STAGES
from kd_utils.io import write_atomic
from kd_utils.params import ParamsError, load_study, teacher_specs
from kd_utils.precision import AUTO_ENV, resolve as resolve_precision
from kd_utils.predictions import CORRECTNESS_FILE, export_correctness
from kd_utils.protocols import get_protocol
from kd_utils.tasks import tasks_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = PROJECT_ROOT / "notebooks"
STUDY_PREFIX = "@study/"  # parameters that point into the study directory (resolved at execution)


@dataclass
class Run:
    stage: str
    notebook: str
    parameters: dict
    deps: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the results.csv columns this run contributes
    label: str = ""
    id: str = ""

    def __post_init__(self):
        if not self.id:
            payload = json.dumps([self.stage, self.notebook, self.parameters, sorted(self.deps)], sort_keys=True)
            self.id = f"{self.stage}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _training_params(params: dict, role: str) -> dict:
    return {**params["training"][role], "protocol": params["protocol"]}


@dataclass
class TeacherRun:
    """One fine-tuned teacher of a domain: its run, how students load it, its name in results and labels."""

    run: Run
    model: str
    adapter: str | None
    name: str  # results.csv's teacher column of its students, and its own eval's model
    label: str  # how run labels name it ("" for a study's only teacher: labels as before)


def _teachers(params: dict, domain: str, seed0: int) -> list[TeacherRun]:
    """The domain's teacher runs: one per ``models.teachers`` entry (each with its own training budget), or
    the one ``models.teacher`` (whose run parameters and names are those of single-teacher studies)."""
    out = []
    for spec in teacher_specs(params):
        run = Run("teacher", "finetune.ipynb", {"model": spec["model"], "domain": domain, "seed": seed0,
                                                "data_dir": params["data_dir"], **spec["training"],
                                                "protocol": params["protocol"]})
        name, detail = spec["name"] or spec["model"], ""
        if spec["name"]:  # the label says what sets this teacher apart: its model and budget
            budget = [f"{k}={v}" for k, v in spec["training"].items() if params["training"]["teacher"][k] != v]
            detail = f" ({', '.join([spec['model']] + budget)})"
        run.label = f"fine-tune teacher {name}{detail} on {domain}"
        adapter = f"{STUDY_PREFIX}runs/{run.id}/adapter" if spec["training"]["lora"] else None
        model = f"{STUDY_PREFIX}runs/{run.id}/model" if adapter is None else spec["model"]
        out.append(TeacherRun(run, model, adapter, f"{name}:{domain}-expert", spec["name"] or ""))
    return out


def plan(params: dict) -> list[Run]:
    """Expand a validated study into runs, in dependency order.

    Every student is distilled from every teacher; its SFT runs (no teacher) are shared by all of them.
    """
    teacher_base = params["models"]["teacher"]  # also the base that layer-subset students are cut from
    ev = params["evaluation"]
    task_ids = [t.id for t in tasks_for(ev["tasks"])]
    eval_common = {"tasks": task_ids, "n_per_task": ev["n_per_task"], "batch_size": ev["batch_size"],
                   "max_new_tokens_math": ev["max_new_tokens"]["math"],
                   "max_new_tokens_commonsense": ev["max_new_tokens"]["commonsense"], "do_sample": ev["do_sample"],
                   "data_dir": params["data_dir"], "protocol": params["protocol"]}
    if ev["scoring"] != "generate":  # left out at the default: the run ids of generate-scored studies stay the same
        eval_common |= {"scoring": ev["scoring"], "loglik_metric": ev["loglik_metric"]}
    seed0 = params["seeds"][0]
    cached_methods = params["teacher_cache"]["methods"] if params["teacher_cache"]["enabled"] else []
    runs: list[Run] = []

    def evaluate(model: str, adapter: str | None, upstream: Run | None, meta: dict, label: str) -> None:
        runs.append(Run("eval", "evaluate.ipynb", {**eval_common, "model": model, "adapter": adapter, "seed": seed0},
                        [upstream.id] if upstream else [], meta, f"eval {label}"))

    if ev["eval_base"]:
        evaluate(teacher_base, None, None, {"role": "base", "model": teacher_base, "teacher": "", "method": "",
                                            "seed": seed0}, teacher_base)
    multi_domain = len(params["domains"]) > 1
    for domain in params["domains"]:
        teachers = _teachers(params, domain, seed0)
        for t in teachers:
            runs.append(t.run)
            evaluate(t.model, t.adapter, t.run, {"role": "teacher", "model": t.name, "teacher": "",
                                                 "method": "sft", "seed": seed0}, t.name)
        caches: dict[tuple, Run] = {}  # (teacher, seed, task-aware) -> the cache run students of that seed share
        for student in params["models"]["students"]:
            name = f"{student['name']}@{domain}" if multi_domain else student["name"]
            if "layers" in student:
                base_args = {"model": teacher_base, "student_layers": student["layers"]}
                student_base = f"{STUDY_PREFIX}runs/student-{Path(teacher_base).name}-L{student['layers']}"
            else:
                base_args, student_base = {"model": student["model"], "student_layers": None}, student["model"]
            for seed in params["seeds"]:
                for method, tau, sigma, expertise in _grid(params):
                    aware = expertise == "task_aware"
                    for t in teachers[:1] if method == "sft" else teachers:  # sft has no teacher: one run
                        run_params = {**base_args, "method": method, "domain": domain, "seed": seed,
                                      "data_dir": params["data_dir"], **_training_params(params, "student")}
                        deps, source = [], ""
                        if method != "sft":
                            run_params.update({"teacher": t.model, "teacher_adapter": t.adapter,
                                               "task_aware_teacher": aware, "temperature": tau, "noise_sigma": sigma,
                                               **params["kd"]})
                            deps = [t.run.id]
                        if method in cached_methods:
                            key = (t.run.id, seed, aware)
                            if key not in caches:
                                caches[key] = cache_run(params, domain, t, aware, seed)
                                runs.append(caches[key])
                            run_params["teacher_cache"] = f"{STUDY_PREFIX}runs/{caches[key].id}"
                            deps, source = [caches[key].id], " (teacher cache)"
                        who = f"{name} from {t.label}" if t.label and method != "sft" else name
                        train = Run("student", "distill.ipynb", run_params, deps,
                                    label=f"{method}{source} {who} tau={tau} sigma={sigma} {expertise} seed={seed}")
                        runs.append(train)
                        student_adapter = f"{STUDY_PREFIX}runs/{train.id}/adapter" if run_params["lora"] else None
                        student_model = student_base if student_adapter else f"{STUDY_PREFIX}runs/{train.id}/model"
                        t_name = "" if method == "sft" else (t.name if aware else f"{teacher_base}:base")
                        evaluate(student_model, student_adapter, train,
                                 {"role": "student", "model": name, "teacher": t_name, "method": method,
                                  "temperature": tau if method != "sft" else None,
                                  "noise_sigma": sigma if method != "sft" else 0.0, "seed": seed},
                                 f"{method} {who} tau={tau} sigma={sigma} {expertise}")
    return runs


def cache_run(params: dict, domain: str, teacher: TeacherRun, aware: bool, seed: int) -> Run:
    """Teacher logit generation over the students' training mix, for every temperature and sigma at once."""
    student = params["training"]["student"]
    cache = params["teacher_cache"]
    return Run("cache", "teacher_cache.ipynb", {
        "teacher": teacher.model, "teacher_adapter": teacher.adapter, "task_aware_teacher": aware, "domain": domain,
        "n_train": student["n_train"], "include_mawps": student["include_mawps"], "data_dir": params["data_dir"],
        "seed": seed, "max_length": student["max_length"], "val_fraction": student["val_fraction"],
        "representation": cache["representation"], "k": cache["k"], "num_samples": cache["num_samples"],
        "temperatures": list(params["temperatures"]), "noise_sigmas": list(params["noise_sigmas"]),
        "epochs": student["epochs"],
        # at its default the key is left out, so the run ids of studies planned before it existed stay the same
        **({"id_coding": cache["id_coding"]} if cache["id_coding"] != "fixed" else {}),
        # the protocol's precision when it is not auto (the teacher cache has no protocol of its own)
        **({"precision": precision} if (precision := get_protocol(params["protocol"]).precision) != "auto" else {})},
        [teacher.run.id], label=f"teacher cache {teacher.label or teacher.model} on {domain} "
                                f"({cache['representation']}) seed={seed}" + ("" if aware else " task-unaware"))


def _grid(params: dict):
    """(method, tau, sigma, expertise) combinations; sft has no teacher, seqkd no temperature or noise."""
    seen = set()
    for method in params["methods"]:
        for tau in params["temperatures"]:
            for sigma in params["noise_sigmas"]:
                for expertise in params["teacher_expertise"]:
                    combo = ((method, 1.0, 0.0, "task_aware") if method == "sft" else
                             (method, 1.0, 0.0, expertise) if method == "seqkd" else (method, tau, sigma, expertise))
                    if combo not in seen:
                        seen.add(combo)
                        yield combo


# ---- executing one run ------------------------------------------------------------------

def resolve(value, study_dir: Path):
    if isinstance(value, str) and value.startswith(STUDY_PREFIX):
        return str(study_dir / value[len(STUDY_PREFIX):])
    return value


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"state": "pending"}


def write_status(run_dir: Path, **status) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "status.json", json.dumps(status, indent=1))


def execute_run(run: Run, study_dir: str | Path) -> dict:
    """Execute one run's notebook into its run directory; the status records success or the error."""
    import papermill as pm

    from kd_utils.report import notebook_to_html

    study_dir = Path(study_dir)
    run_dir = study_dir / "runs" / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = {k: resolve(v, study_dir) for k, v in run.parameters.items()}
    parameters["output_dir"] = str(run_dir)
    write_atomic(run_dir / "params.json", json.dumps({"run": asdict(run), "resolved": parameters}, indent=1))
    started = time.time()
    job = {"job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}
    write_status(run_dir, state="running", started=started, label=run.label, **job)
    executed = run_dir / run.notebook
    partial = run_dir / f".partial.{run.notebook}"  # ends in .ipynb, as papermill expects
    try:
        pm.execute_notebook(str(NOTEBOOKS / run.notebook), str(partial), parameters=parameters,
                            cwd=str(PROJECT_ROOT), progress_bar=False, kernel_name="python3")
        partial.replace(executed)
        notebook_to_html(executed, executed.with_suffix(".html"))
        status = {"state": "done", "started": started, "seconds": time.time() - started, "label": run.label, **job}
    except Exception as err:  # noqa: BLE001 - any failure of a run is recorded, not raised
        status = {"state": "failed", "started": started, "seconds": time.time() - started, "label": run.label,
                  "error": f"{type(err).__name__}: {getattr(err, 'evalue', None) or err}",
                  "traceback": traceback.format_exc(), **job}
    write_status(run_dir, **status)
    return status


# ---- executors --------------------------------------------------------------------------

class LocalExecutor:
    """Runs on this machine, ``parallel`` independent runs at a time (each notebook has its own kernel)."""

    submits_with_dependencies = False

    def __init__(self, parallel: int = 1):
        self.capacity = max(1, parallel)  # execute() submits no more: a queued run could not be overtaken
        self.pool = ThreadPoolExecutor(max_workers=self.capacity)

    def submit(self, run: Run, study_dir: Path, dep_jobs: list):
        return self.pool.submit(execute_run, run, study_dir)

    @staticmethod
    def attach(status: dict, study_dir: Path):
        return None  # nothing outlives this process: a run left "running" was interrupted

    @staticmethod
    def wait_any(jobs: list):
        return next(iter(wait(jobs, return_when=FIRST_COMPLETED).done))

    @staticmethod
    def result(job) -> dict:
        return job.result()

    @staticmethod
    def cancel(job) -> None:
        job.cancel()


class RunJob:
    """One run as a submitit job. Checkpointable, so a job that reaches its time limit is requeued
    like a preempted one (submitit requeues those anyway); the requeued job executes the run again,
    and training resumes from the run's last epoch checkpoint."""

    def __call__(self, run: Run, study_dir: Path) -> dict:
        return execute_run(run, study_dir)

    def checkpoint(self, run: Run, study_dir: Path):
        import submitit

        return submitit.helpers.DelayedSubmission(self, run, study_dir)


# Slurm job states in which a job may still run (squeue's long names)
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def slurm_states() -> dict[str, str]:
    """job id -> state of this user's jobs that Slurm still lists (squeue; works without accounting)."""
    out = subprocess.run(["squeue", "-h", "--me", "-t", "all", "-o", "%i %T"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


class SubmititExecutor:
    """Each run a job through submitit: Slurm with afterok dependencies, or submitit's local executor.

    Resources come per stage from ``execution.slurm_resources``; dependents of a failed job are
    cancelled by Slurm (--kill-on-invalid-dep=yes) and by the runner.
    """

    def __init__(self, study_dir: Path, cluster: str = "slurm", slurm: dict | None = None,
                 resources: dict[str, dict] | None = None):
        import submitit

        slurm = slurm or {}
        self.slurm = cluster == "slurm"
        self.submits_with_dependencies = self.slurm
        self.folder = study_dir / "submitit" / "%j"
        self.executor = submitit.AutoExecutor(folder=str(self.folder), cluster=cluster)
        self.resources = {}
        for stage, res in (resources or {}).items():
            res = dict(res)
            if not self.slurm or not res.get("gpus_per_node"):
                res["gpus_per_node"] = None  # no --gpus-per-node line: clusters without GPUs reject even 0
            self.resources[stage] = res
        self.common = {f"slurm_{k}": v for k, v in (("partition", slurm.get("partition")),
                                                   ("account", slurm.get("account"))) if v and self.slurm}

    def submit(self, run: Run, study_dir: Path, dep_jobs: list):
        additional = {"kill-on-invalid-dep": "yes"} if self.slurm else {}
        if dep_jobs:
            additional["dependency"] = "afterok:" + ":".join(j.job_id for j in dep_jobs)
        self.executor.update_parameters(name=run.id, **self.resources.get(run.stage, {}), **self.common,
                                        **({"slurm_additional_parameters": additional} if self.slurm else {}))
        job = self.executor.submit(RunJob(), run, study_dir)
        if self.slurm:  # recorded so that a later submission waits for this job instead of repeating it
            write_status(study_dir / "runs" / run.id, state="queued", label=run.label, job_id=job.job_id,
                         submitted=time.time())
        return job

    def attach(self, status: dict, study_dir: Path):
        """The Slurm job of a run an earlier submission queued, while Slurm still may run it."""
        import submitit

        job_id = status.get("job_id")
        if not self.slurm or status["state"] not in ("queued", "running") or not job_id:
            return None
        if slurm_states().get(job_id) not in SLURM_ACTIVE:
            return None
        return submitit.SlurmJob(folder=self.folder, job_id=job_id)

    def wait_any(self, jobs: list):
        """The first finished job. On Slurm a job is finished when it wrote its result or Slurm
        no longer has it active (cancelled, failed, killed for an invalid dependency); squeue is asked,
        not sacct, which needs accounting."""
        while True:
            states = slurm_states() if self.slurm else {}
            for job in jobs:
                if job.paths.result_pickle.exists() or (
                        job.done() if not self.slurm else states.get(job.job_id) not in SLURM_ACTIVE):
                    return job
            time.sleep(1.0)

    def result(self, job) -> dict:
        if self.slurm and not job.paths.result_pickle.exists():
            state = slurm_states().get(job.job_id, "no longer listed by Slurm")
            raise RuntimeError(f"Slurm job {job.job_id} ended {state} without a result (log: {job.paths.stderr})")
        return job.result()

    def cancel(self, job) -> None:
        job.cancel(check=False)


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

    ``statuses`` holds the known state of runs outside ``runs`` (dependencies of an --only selection).
    Runs whose Slurm job an earlier submission queued are waited for, not submitted again.
    """
    statuses = dict(statuses or {})
    statuses.update({r.id: read_status(study_dir / "runs" / r.id) for r in runs})
    todo = [r for r in runs if statuses[r.id]["state"] != "done"]
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


def collect_results(params: dict, runs: list[Run], statuses: dict[str, dict], study_dir: Path) -> pd.DataFrame:
    """results.csv (the design card's contract) from every finished evaluation run, plus models.csv."""
    rows, sizes = [], {}
    for run in runs:
        if run.stage != "eval" or statuses[run.id]["state"] != "done":
            continue
        metrics = pd.read_csv(study_dir / "runs" / run.id / "metrics.csv")
        for rec in metrics.to_dict("records"):
            # precision stays empty for a metrics.csv from before it was recorded (fp32 on a CPU, bf16 weights on a GPU)
            rows.append({"study": params["study"], "run_id": run.id, "temperature": None, "noise_sigma": 0.0,
                         "protocol": run.parameters["protocol"], "scoring": "generate", "loglik_metric": None,
                         "precision": None, **run.meta, **rec})
        model_dir = resolve(run.parameters["model"], study_dir)
        if run.meta["model"] not in sizes and Path(model_dir).is_dir():
            sizes[run.meta["model"]] = count_model_parameters(model_dir)
    if rows:
        results = pd.DataFrame(rows)[list(RESULT_COLUMNS)]
    else:
        results = pd.DataFrame(columns=list(RESULT_COLUMNS))
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


def analysis_run(params: dict, results: pd.DataFrame) -> Run:
    """The analysis notebook over results.csv; its id changes whenever the results do."""
    parameters = {"results_source": "study", "results_path": f"{STUDY_PREFIX}results.csv",
                  "runs_dir": f"{STUDY_PREFIX}runs", "models_path": f"{STUDY_PREFIX}models.csv",
                  "report_dir": STUDY_PREFIX, **params["analysis"]}  # report.html is read from the study directory
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode() + results.to_csv(index=False).encode())
    return Run("analysis", "analysis.ipynb", parameters, label="analysis and report",
               id=f"analysis-{digest.hexdigest()[:12]}")


def keep_analysis_tables(run_dir: Path, target: Path) -> None:
    """The analysis run's CSVs and provenance.json, copied beside results.csv (what a committed study keeps)."""
    target.mkdir(exist_ok=True)
    for old in target.glob("*.csv"):
        old.unlink()  # tables of an earlier analysis that this one did not write
    for path in [*sorted(run_dir.glob("*.csv")), run_dir / "provenance.json"]:
        if path.is_file():
            write_atomic(target / path.name, path.read_bytes())


def run_study(params_path: str | Path, executor_name: str | None = None, dry_run: bool = False,
              only: str | None = None, output_root: str | Path | None = None) -> int:
    """Plan and execute a study; returns the process exit code (0 when every run succeeded)."""
    params = load_study(params_path)
    root = Path(output_root or params["output_dir"])
    study_dir = (root if root.is_absolute() else PROJECT_ROOT / root) / params["study"]
    runs = plan(params)
    if only is not None:
        if only not in STAGES:
            raise ParamsError("--only", [f"unknown stage {only!r}; expected one of {', '.join(STAGES)}"])
    statuses = {r.id: read_status(study_dir / "runs" / r.id) for r in runs}
    if dry_run:
        print(f"study {params['study']}: {len(runs)} runs (+ analysis) into {study_dir}")
        for r in runs:
            print(f"  {statuses[r.id]['state']:8s} {r.id:22s} {r.label} [protocol {r.parameters.get('protocol', params['protocol'])}]"
                  + (f"  <- {', '.join(r.deps)}" if r.deps else ""))
        print(costs.format_estimate(params, runs, costs.load_table(), costs.default_table_path()))
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
    executor = (LocalExecutor(execution["parallel"]) if name == "local" else
                SubmititExecutor(study_dir, "slurm" if name == "slurm" else "local", execution["slurm"],
                                 execution["slurm_resources"]))
    selected = [r for r in runs if only in (None, r.stage)]
    statuses = execute(selected, study_dir, executor, statuses)
    if only in (None, "analysis"):
        results = collect_results(params, runs, statuses, study_dir)
        analysis = analysis_run(params, results)
        statuses = execute([analysis], study_dir, executor, statuses)
        html = study_dir / "runs" / analysis.id / "analysis.html"
        if statuses[analysis.id]["state"] == "done":
            write_atomic(study_dir / "report.html", html.read_text(encoding="utf-8"))
            keep_analysis_tables(study_dir / "runs" / analysis.id, study_dir / "analysis")
    failed = {rid: s for rid, s in statuses.items() if s["state"] in ("failed", "skipped")}
    done = sum(s["state"] == "done" for s in statuses.values())
    print(f"\n{params['study']}: {done} runs done, {len(failed)} failed or skipped; outputs in {study_dir}")
    for rid, s in failed.items():
        print(f"  {s['state']}: {s.get('label', rid)} ({rid}): {s.get('error', '')}")
    if (study_dir / "report.html").is_file():
        print(f"report: {study_dir / 'report.html'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_utils.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a study")
    run.add_argument("params", help="a study YAML file, e.g. params/default.yaml")
    run.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    run.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default=None)
    run.add_argument("--only", choices=STAGES, default=None, help="run only this stage's runs")
    run.add_argument("--output-root", default=None, help="override the params' output_dir")
    args = parser.parse_args(argv)
    try:
        return run_study(args.params, args.executor, args.dry_run, args.only, args.output_root)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
