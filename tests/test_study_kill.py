"""A real kill: the study runner, in its own process group, is killed with SIGKILL while a run is in
progress and then resumed. Finished runs are left as they were, the interrupted run is redone, and the
results equal an uninterrupted study's."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_study import comparable

from kd_utils import study
from kd_utils.params import load_study

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``; notebook kernels start their own sessions, outside its group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def wait_for(condition, what: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_study_killed_with_sigkill_resumes_to_the_uninterrupted_results(mini_params, mini_finished, tmp_path):
    runs = study.plan(load_study(mini_params))
    run_dirs = {r.id: tmp_path / "mini" / "runs" / r.id for r in runs}
    runner = subprocess.Popen([sys.executable, "-m", "kd_utils.study", "run", str(mini_params), "--output-root",
                               str(tmp_path)], cwd=study.PROJECT_ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def in_progress():  # two runs finished and a third under way (the local executor runs one at a time)
        states = {rid: study.read_status(d)["state"] for rid, d in run_dirs.items()}
        running = [rid for rid, s in states.items() if s == "running"]
        return running if sum(s == "done" for s in states.values()) >= 2 and running else None

    wait_for(in_progress, "a run in progress after two finished ones")
    tree = descendants(runner.pid)
    os.killpg(runner.pid, signal.SIGKILL)
    for pid in tree:  # the kernel's own session too: nothing of the study may keep running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    runner.wait()
    wait_for(lambda: not any(alive(p) for p in tree), "every process of the killed study to end", timeout=60)
    killed_at = time.time()

    states = {rid: study.read_status(d) for rid, d in run_dirs.items()}
    interrupted = [rid for rid, s in states.items() if s["state"] == "running"]
    done = [rid for rid, s in states.items() if s["state"] == "done"]
    assert len(interrupted) == 1 and len(done) >= 2
    before = {rid: snapshot(run_dirs[rid]) for rid in done}

    assert study.run_study(mini_params, output_root=tmp_path) == 0
    for rid in done:
        assert snapshot(run_dirs[rid]) == before[rid], rid  # bytes and mtimes: not touched
    redone = study.read_status(run_dirs[interrupted[0]])
    assert redone["state"] == "done" and redone["started"] > killed_at
    pd.testing.assert_frame_equal(comparable(pd.read_csv(tmp_path / "mini" / "results.csv")),
                                  comparable(pd.read_csv(mini_finished / "results.csv")))
