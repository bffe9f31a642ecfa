"""Executing a study's runs: one run's notebook through papermill (:func:`execute_run`), and the executors that
run them: on this machine (:class:`LocalExecutor`), or as submitit jobs on Slurm or locally (:class:`SubmititExecutor`).

An executor has ``submit(run, study_dir, dep_jobs)``, ``attach(status, study_dir)`` (the job of a run an earlier
submission queued), ``wait_any(jobs)``, ``result(job)`` (the run's status), ``cancel(job)`` and ``close()`` (at the
end of a submission), and says whether it queues dependents behind their dependencies' jobs
(``submits_with_dependencies``) and how many runs it takes at once (``capacity``, None: no limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from kd_utils.constants import PROJECT_ROOT
from kd_utils.io import write_atomic
from kd_utils.kernels import WarmKernels, notebook_modules
from kd_utils.plan import Run, resolve
from kd_utils.run_records import record_outputs, write_status

NOTEBOOKS = PROJECT_ROOT / "notebooks"
KERNEL_READY_TIMEOUT_S = 900


def execute_run(run: Run, study_dir: str | Path, kernels: WarmKernels | None = None) -> dict:
    """Execute one run's notebook into its run directory; the status records success or the error.

    ``kernels``: where to take a started kernel from (shut down after the run); None: papermill starts one."""
    import papermill as pm

    from kd_utils.report import notebook_to_html

    study_dir = Path(study_dir)
    run_dir = study_dir / "runs" / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = {k: resolve(v, study_dir) for k, v in run.parameters.items()}
    parameters["output_dir"] = str(run_dir)
    write_atomic(run_dir / "params.json", json.dumps({"run": asdict(run), "resolved": parameters}, indent=1))
    started = time.time()
    extra = {"job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}
    if kernels is not None and kernels.env:
        extra["kernel_env"] = kernels.env  # e.g. the torch threads the local executor gave the run
    write_status(run_dir, state="running", started=started, label=run.label, **extra)
    executed = run_dir / run.notebook
    partial = run_dir / f".partial.{run.notebook}"  # ends in .ipynb, as papermill expects
    kernel = None
    try:
        kernel = kernels.take() if kernels is not None else None
        # a warm kernel may still be importing: its start-up waits for that, not the default 60 s
        pm.execute_notebook(str(NOTEBOOKS / run.notebook), str(partial), parameters=parameters,
                            cwd=str(PROJECT_ROOT), progress_bar=False, kernel_name="python3",
                            **({"km": kernel, "start_timeout": KERNEL_READY_TIMEOUT_S} if kernel else {}))
        partial.replace(executed)
        notebook_to_html(executed, executed.with_suffix(".html"))
        hashing = time.time()  # hashed here, where they were written: a rerun verifies them before reusing them
        outputs = record_outputs(run_dir)
        status = {"state": "done", "started": started, "seconds": time.time() - started, "label": run.label, **extra,
                  "hash_seconds": round(time.time() - hashing, 3), "outputs": outputs}
    except Exception as err:  # noqa: BLE001 - any failure of a run is recorded, not raised
        status = {"state": "failed", "started": started, "seconds": time.time() - started, "label": run.label,
                  "error": f"{type(err).__name__}: {getattr(err, 'evalue', None) or err}",
                  "traceback": traceback.format_exc(), **extra}
    finally:
        if kernel is not None:
            kernel.close()
    write_status(run_dir, **status)
    return status


def notebook_kernels(**kwargs) -> WarmKernels:
    """Warm kernels that preload what the project's notebooks import, started in the project root."""
    return WarmKernels(notebook_modules(sorted(NOTEBOOKS.glob("*.ipynb"))), PROJECT_ROOT, **kwargs)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch when a kernel imports it


def run_threads(parallel: int, configured: int | None = None) -> int | None:
    """Torch threads for each of ``parallel`` local runs: ``configured``; else ``$OMP_NUM_THREADS`` when set; else,
    with several runs at once, torch's default (usually the physical cores) shared out among them; None: torch's
    default. ``parallel`` runs that each spread over every core wait on one another at every barrier
    (docs/benchmarks.md measured 10x slower)."""
    if configured is not None:
        return configured
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    if parallel <= 1:
        return None
    import torch

    return max(1, torch.get_num_threads() // parallel)


class LocalExecutor:
    """Runs on this machine, ``parallel`` independent runs at a time. Each notebook has its own kernel, started
    while the run before it executed (:class:`~kd_utils.kernels.WarmKernels`)."""

    submits_with_dependencies = False

    def __init__(self, parallel: int = 1, threads_per_run: int | None = None):
        self.capacity = max(1, parallel)  # execute() submits no more: a queued run could not be overtaken
        self.pool = ThreadPoolExecutor(max_workers=self.capacity)
        self.threads = run_threads(self.capacity, threads_per_run)
        self.kernels = notebook_kernels(env={var: str(self.threads) for var in THREAD_VARIABLES}
                                        if self.threads else None)

    def submit(self, run: Run, study_dir: Path, dep_jobs: list):
        return self.pool.submit(execute_run, run, study_dir, self.kernels)

    def close(self) -> None:
        """Shut down the kernel started for a run that never came."""
        self.pool.shutdown(wait=True)
        self.kernels.close()

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

    def close(self) -> None:
        """Nothing to release: each job runs in a process of its own."""
