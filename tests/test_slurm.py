"""The study runner against a real one-node Slurm cluster (start one with tests/slurm/cluster.sh start).

One mini study (tests/conftest.py) is submitted while the partition is down, so its jobs stay queued: the test reads
their dependencies from Slurm, submits the study a second time (refused), kills the first submission
and resumes it (the queued jobs are waited for, not resubmitted), then lets the jobs run. A second,
smaller study has a job scancelled while it runs and a run that fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import mini_content
from test_study import comparable

from kd_utils import study
from kd_utils.params import load_study

CONF = Path(__file__).resolve().parent / "slurm" / "logs" / "slurm.conf"
if CONF.is_file():
    os.environ.setdefault("SLURM_CONF", str(CONF))


def cluster_answers() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"idle|mixed|allocated", out.stdout))


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not cluster_answers(), reason="no Slurm cluster answers "
                                 "(start one with tests/slurm/cluster.sh start)")]
TINY = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 3, "timeout_min": 30}  # fits the one small node
TIMEOUT = 900  # seconds for a whole study on a loaded 2-core machine


def slurm_study(content: dict, path: Path, **changes) -> Path:
    content = dict(content)
    content["execution"] = {"slurm_resources": {stage: dict(TINY) for stage in study.STAGES}}
    content.update(changes)
    path.write_text(yaml.safe_dump(content))
    return path


def submit(params: Path, out: Path) -> subprocess.Popen:
    """The runner in its own process group, as a user would start it."""
    return subprocess.Popen([sys.executable, "-m", "kd_utils.study", "run", str(params), "--executor", "slurm",
                             "--output-root", str(out)], cwd=study.PROJECT_ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def all_in_state(found: dict[str, dict], state: str) -> dict[str, dict] | None:
    return found if all(s["state"] == state for s in found.values()) else None


def statuses(study_dir: Path, runs) -> dict[str, dict]:
    return {r.id: study.read_status(study_dir / "runs" / r.id) for r in runs}


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return re.search(rf"\b{name}=(\S*)", out).group(1)


def partition() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                          check=True).stdout.split()[0].rstrip("*")


def set_partition(state: str) -> None:
    subprocess.run(["scontrol", "update", f"partitionname={partition()}", f"state={state}"], check=True)


@pytest.fixture(scope="module")
def resumed_on_slurm(mini_params, tmp_path_factory):
    """Submit with the partition down, check the queue, submit again, kill, resume, let it run."""
    root = tmp_path_factory.mktemp("slurm-mini")
    params = slurm_study(yaml.safe_load(mini_params.read_text()), root / "mini.yaml")
    runs = study.plan(load_study(params))
    study_dir = root / "out" / "mini"
    set_partition("DOWN")
    try:
        first = submit(params, root / "out")
        queued = wait_for(lambda: all_in_state(statuses(study_dir, runs), "queued"), "every run queued")
        dependencies = {r.id: job_field(queued[r.id]["job_id"], "Dependency") for r in runs}
        second = subprocess.run([sys.executable, "-m", "kd_utils.study", "run", str(params), "--executor", "slurm",
                                 "--output-root", str(root / "out")], cwd=study.PROJECT_ROOT, capture_output=True,
                                text=True, timeout=120)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        resumed = submit(params, root / "out")
        output = ""
        while output.count("of an earlier submission") < len(runs) and resumed.poll() is None:
            output += resumed.stdout.readline()  # the queued jobs taken over, before any of them can run
    finally:
        set_partition("UP")
    rest, _ = resumed.communicate(timeout=TIMEOUT)
    output += rest
    return {"runs": runs, "queued": queued, "dependencies": dependencies, "second": second,
            "code": resumed.returncode, "output": output, "study_dir": study_dir}


def test_jobs_are_submitted_with_the_run_graph_as_dependencies(resumed_on_slurm):
    queued, deps = resumed_on_slurm["queued"], resumed_on_slurm["dependencies"]
    for run in resumed_on_slurm["runs"]:
        expected = {queued[d]["job_id"] for d in run.deps}
        assert set(re.findall(r"afterok:(\d+)", deps[run.id])) == expected, (run.label, deps[run.id])


def test_a_second_submission_while_jobs_are_queued_is_refused(resumed_on_slurm):
    second = resumed_on_slurm["second"]
    assert second.returncode == 3, second.stdout + second.stderr
    assert "being run by another submission" in second.stderr


def test_a_killed_submission_resumes_by_waiting_for_its_queued_jobs(resumed_on_slurm):
    assert resumed_on_slurm["code"] == 0, resumed_on_slurm["output"]
    final = statuses(resumed_on_slurm["study_dir"], resumed_on_slurm["runs"])
    for rid, queued in resumed_on_slurm["queued"].items():
        assert final[rid]["state"] == "done"
        assert final[rid]["job_id"] == queued["job_id"]  # ran in the job the first submission queued
    assert resumed_on_slurm["output"].count("of an earlier submission") == len(resumed_on_slurm["runs"])


def test_slurm_gives_the_results_and_report_of_the_local_executor(resumed_on_slurm, mini_finished):
    study_dir = resumed_on_slurm["study_dir"]
    pd.testing.assert_frame_equal(comparable(pd.read_csv(study_dir / "results.csv")),
                                  comparable(pd.read_csv(mini_finished / "results.csv")))
    assert (study_dir / "report.html").stat().st_size > 10_000


@pytest.fixture(scope="module")
def cancelled_and_failing(smoke_params, tmp_path_factory):
    """The mini study, sft only, with a broken student; the teacher's job is scancelled while it runs, then a rerun."""
    root = tmp_path_factory.mktemp("slurm-cancel")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    content = mini_content(smoke_params)
    students = content["models"]["students"] + [{"name": "broken", "model": str(broken)}]
    params = slurm_study(content, root / "study.yaml", methods=["sft"],
                         models={**content["models"], "students": students})
    runs = study.plan(load_study(params))
    study_dir = root / "out" / "mini"
    teacher = next(r for r in runs if r.stage == "teacher")
    first = submit(params, root / "out")
    running = wait_for(lambda: all_in_state({teacher.id: study.read_status(study_dir / "runs" / teacher.id)},
                                            "running"), "the teacher's run to start")[teacher.id]
    subprocess.run(["scancel", running["job_id"]], check=True)
    output, _ = first.communicate(timeout=TIMEOUT)
    after_first = statuses(study_dir, runs)
    left = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    rerun = submit(params, root / "out")
    rerun_output, _ = rerun.communicate(timeout=TIMEOUT)
    return {"runs": runs, "teacher": teacher, "code": first.returncode, "output": output, "first": after_first,
            "queue_after_first": left, "rerun_code": rerun.returncode, "rerun_output": rerun_output,
            "final": statuses(study_dir, runs)}


def test_a_cancelled_job_fails_its_run_and_its_dependents_are_not_left_pending(cancelled_and_failing):
    c = cancelled_and_failing
    assert c["code"] == 1
    first = c["first"]
    teacher = first[c["teacher"].id]
    assert teacher["state"] == "failed" and teacher["error"]  # the kernel killed by scancel's signal
    assert f"failed: {c['teacher'].label} ({c['teacher'].id})" in c["output"]
    for run in c["runs"]:
        if run.deps == [c["teacher"].id]:  # the teacher's evaluation
            assert first[run.id]["state"] == "skipped" and c["teacher"].id in first[run.id]["error"]
    assert not any(r.id in c["queue_after_first"] for r in c["runs"])  # nothing of the study left queued


def test_a_failing_run_is_named_and_independent_runs_complete(cancelled_and_failing):
    c = cancelled_and_failing
    broken = next(r for r in c["runs"] if r.stage == "student" and "broken" in r.label)
    assert c["first"][broken.id]["state"] == "failed"
    assert f"failed: {broken.label} ({broken.id})" in c["output"]
    independent = [r for r in c["runs"] if r.stage == "student" and r is not broken]
    independent += [r for r in c["runs"] if r.deps and set(r.deps) <= {i.id for i in independent}]  # their evals
    assert independent and all(c["first"][r.id]["state"] == "done" for r in independent)


def test_a_rerun_after_scancel_resubmits_only_what_is_not_done(cancelled_and_failing):
    c = cancelled_and_failing
    assert c["rerun_code"] == 1  # the broken student fails again
    for run in c["runs"]:
        before, after = c["first"][run.id], c["final"][run.id]
        if before["state"] == "done":
            assert after == before  # untouched: same job, same start time
        elif "broken" not in run.label:
            assert after["state"] == "done" and after["job_id"] != before.get("job_id")
    assert c["final"][c["teacher"].id]["state"] == "done"
